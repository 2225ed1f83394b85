"""``owner-agent``: the data owner's command. Thin: parse, call, print.

Keys are named with ``--key NAME`` (a keyring name or a key file path); the secret itself is
never accepted on the command line. Errors the owner can act on are printed as one line, chosen
by type (``owners/errors.py``, and the shared format's ManifestError and TaskError).
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import warnings
from pathlib import Path

from PIL import Image

from owners import __version__
from owners.cipher import ACCEPT_FLAG, SCHEMES, CipherGeometry, privacy_gate
from owners.errors import OwnerError
from owners.keys import (
    KeyringError,
    announce_new_key,
    create_key,
    derive_from_passphrase,
    keyring_dir,
    list_keys,
    read_passphrase_file,
    resolve_key,
)
from owners.upload import Connection, read_token
from protocol.codec import CHROMA_SUBSAMPLING, CODECS, Codec, CodecError
from protocol.shards import ManifestError
from protocol.task import DEFAULT_BLOCK, SPLITS, Task, TaskError

KEY_HELP = "key name in the keyring (created on first use) or path of a key file; never the secret"


def _key(spec: str, create: bool):
    key, created = resolve_key(spec, create=create)
    if created:
        announce_new_key(key)
    return key


def _key_or_plain(args: argparse.Namespace, create: bool, what: str, key_optional: bool = False):
    """The owner's key, or None for --plain. ``key_optional``: neither is fine too (None), because the
    task may encrypt every image under its own fresh key (task.key_mode per-image), which needs no key."""
    if args.plain == bool(args.key) and not (key_optional and not args.plain):
        raise SystemExit(f"owner-agent {args.command}: give --key NAME, or --plain for {what} (not both)")
    return None if args.plain or not args.key else _key(args.key, create=create)


def _connection(args: argparse.Namespace, service: str = "ingest", **extra) -> Connection:
    """From the flags; without --server, from the joined profile (flags still override its fields)."""
    from owners.profile import Profile, load_profile

    profile, token = (Profile(args.server, predict_server=args.server), None) if args.server else \
        load_profile(args.profile)
    if args.token_file or token is None:
        token = read_token(args.token_file)

    def path(flag: str | None, saved: str | None) -> Path | None:
        return Path(flag or saved) if (flag or saved) else None

    return Connection(server=profile.server_for(service), token=token, ca_file=path(args.ca_file, profile.ca_file),
                      client_cert=path(args.client_cert, profile.client_cert),
                      client_key=path(args.client_key, profile.client_key),
                      insecure=args.insecure or profile.insecure, **extra)


def cmd_join(args: argparse.Namespace) -> int:
    """Check the server answers this token, then remember it as a profile."""
    from owners.profile import Profile, save_profile
    from owners.upload import IngestClient

    def absolute(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value else None

    conn = _connection(args, retries=1)
    client = IngestClient(conn, log=_log)
    try:
        task = client.get_task()
    finally:
        client.close()
    profile = Profile(conn.server, absolute(args.ca_file), absolute(args.client_cert), absolute(args.client_key),
                      args.insecure, args.predict_server)
    path = save_profile(args.profile, profile, conn.token)
    _log(f"joined {conn.server} as owner {task.owner_id} (run {task.run_name}); profile {args.profile!r} saved in "
         f"{path}. Now: owner-agent --key NAME --data DIR")
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- commands


def cmd_encrypt(args: argparse.Namespace) -> int:
    from owners.encrypt import EncryptSettings, encrypt_folder

    task = _task_from_flags(args)  # bad flags are refused before a key is created
    if task.per_image_keys and args.key:  # not even looked up: nothing about it is needed
        _log(f"--key {args.key} is unused: --per-image-keys encrypts every image under its own fresh key")
    key = None if task.per_image_keys else _key_or_plain(args, create=True, what="an unencrypted baseline")
    settings = EncryptSettings(task=task, split=args.split, shard_images=args.shard_images,
                               max_bad_fraction=args.max_bad_fraction)
    summary = encrypt_folder(Path(args.data), Path(args.out), key, settings, overwrite=args.overwrite,
                             progress=False if args.no_progress else None)
    _log(summary.line())
    if summary.skipped or summary.duplicates:
        _log(f"warning: {summary.skipped + summary.duplicates} file(s) not used; reasons in "
             f"{Path(args.out) / 'local' / 'report.json'}")
    _log(f"outbox ready: {args.out} (manifest.json + shards; 'local/' stays on this machine)")
    return 0


def _task_from_flags(args: argparse.Namespace) -> Task:
    """The task ``owner-agent encrypt`` produces; classes default to the folder's, sorted."""
    from owners.images import scan_image_folder

    block = args.block or DEFAULT_BLOCK[args.scheme]
    if not args.plain:  # the cipher's own check names the flag values (--size, --block)
        CipherGeometry(args.size, args.size, block, args.scheme)
    classes = (tuple(c.strip() for c in args.classes.split(",")) if args.classes
               else scan_image_folder(Path(args.data)).classes)
    task = Task(classes, args.size, block, "plain" if args.plain else args.scheme, args.format, args.quality,
                args.chroma, "per-image" if args.per_image_keys else "owner")
    if task.encrypted:  # the outbox is what the cloud will hold: the verdict before anything is written
        privacy_gate(CipherGeometry.for_task(task), task.key_mode, args.accept_cloud_can_decrypt, _log)
    return task


def cmd_upload(args: argparse.Namespace) -> int:
    from owners.agent import run_agent  # grpc is only needed here

    key = _key_or_plain(args, create=True, what="an unencrypted baseline", key_optional=True)
    conn = _connection(args, retries=args.retries, max_rate=args.max_rate)
    summary = run_agent(key, Path(args.data), conn, args.split, Path(args.outbox) if args.outbox else None,
                        args.new_key_domain, progress=False if args.no_progress else None,
                        shard_images=args.shard_images, accept_cloud_can_decrypt=args.accept_cloud_can_decrypt,
                        plain_ok=args.plain)
    print(json.dumps(summary))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from owners.predict import predict_federated, predict_images, write_results

    key = _key_or_plain(args, create=False, what="a plain model", key_optional=not args.federated)
    if args.federated and (args.server or key is None):
        raise SystemExit("owner-agent predict: give --server HOST:PORT (the cloud's model; default: the joined "
                         "profile's), or --federated STATE_DIR with your --key (a federated model, here)")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise SystemExit(f"owner-agent predict: --output {args.output}: give a .csv or .json file name")
    progress = False if args.no_progress else None
    if args.federated:
        results = predict_federated(key, [Path(p) for p in args.images], Path(args.federated), top=args.top,
                                    progress=progress)
    else:
        results = predict_images(key, [Path(p) for p in args.images], _connection(args, "predict"), top=args.top,
                                 accept_cloud_can_decrypt=args.accept_cloud_can_decrypt, log=_log,
                                 progress=progress, plain_ok=args.plain)
    if args.output:
        write_results(results, Path(args.output))
    else:
        for result in results:
            print(f"{result.path}\terror: {result.error}" if result.error else
                  f"{result.path}\t" + "  ".join(f"{name} {p:.3f}" for name, p in result.top))
    failed = sum(1 for r in results if r.error)
    _log(f"predicted {len(results) - failed} image(s), {failed} refused"
         + (f"; results in {args.output}" if args.output else ""))
    return 1 if failed else 0


def cmd_federate(args: argparse.Namespace) -> int:
    from owners.federate import prepare_federation, run_supernode
    from protocol.net import is_loopback

    key = _key(args.key, create=False)
    conn = _connection(args)
    if args.insecure and not is_loopback(args.flower):
        raise SystemExit("owner-agent federate: --insecure is only allowed towards a loopback address")
    config = prepare_federation(args.key, key, Path(args.data), Path(args.test_data) if args.test_data else None,
                                conn, args.adapter_init, False if args.no_progress else None, _log)
    return run_supernode(args.flower, config, Path(args.ca_file) if args.ca_file else None, args.insecure, _log)


def cmd_node_key(args: argparse.Namespace) -> int:
    from owners.federate import node_key

    path, public = node_key(keyring_dir().parent)
    _log(f"node key: {path} (private, stays here). Give the operator this line for your "
         "ingest.owners entry's node_public_key:")
    print(public)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    from owners.decrypt import decrypt_folder

    key = _key(args.key, create=False) if args.key else None
    n = decrypt_folder(Path(args.shards), Path(args.out), key)
    _log(f"{n} images decrypted into {args.out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from owners.audit import AuditPlan, run_audit, table_text

    geometry = CipherGeometry(args.size, args.size, args.block or DEFAULT_BLOCK[args.scheme], args.scheme)
    codec = Codec(args.format, args.quality, args.chroma)
    counts = tuple(int(c) for c in args.images.split(","))
    pairs = tuple(int(c) for c in args.pairs.split(","))
    key = _key(args.key, create=False)
    plan = AuditPlan(counts=counts, pairs=pairs, per_image=args.per_image, limit=args.limit)
    report = run_audit(Path(args.data), key.secret, geometry, codec, plan, Path(args.out),
                       Path(args.prior) if args.prior else None, args.per_image_keys)
    print(json.dumps(report.as_dict(), indent=1) if args.json else table_text(report))
    _log(f"picture (plain | encrypted as uploaded | what each attack reconstructs) written to {args.out}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from owners.preview import make_preview

    geometry = CipherGeometry(args.size, args.size, args.block or DEFAULT_BLOCK[args.scheme], args.scheme)
    codec = Codec(args.format, args.quality, args.chroma)  # bad flags are refused before a key is created
    key = _key(args.key, create=True)
    n = make_preview(Path(args.data), Path(args.out), key, geometry, codec, count=args.count)
    _log(f"preview of {n} images (plain | encrypted as uploaded | decrypted) written to {args.out}")
    return 0


def _read_passphrase(args: argparse.Namespace) -> str | None:
    if args.passphrase_file:
        return read_passphrase_file(Path(args.passphrase_file))
    if args.passphrase_stdin:
        if sys.stdin.isatty():
            first = getpass.getpass("passphrase: ")
            if getpass.getpass("again: ") != first:
                raise KeyringError("passphrases differ")
            return first
        return sys.stdin.readline().rstrip("\r\n")
    return None


def cmd_keygen(args: argparse.Namespace) -> int:
    passphrase = _read_passphrase(args)
    if passphrase is None:
        key = create_key(args.name)
    else:
        secret = derive_from_passphrase(passphrase, args.salt or args.name)
        key = create_key(args.name, secret=secret, origin="passphrase")
    announce_new_key(key)
    print(f"{key.name}\t{key.key_id}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    keys = list_keys()
    if not keys:
        _log(f"no keys in {keyring_dir()}")
    for key in keys:
        print(f"{key.name}\t{key.key_id}\t{key.path}")
    return 0


# --------------------------------------------------------------------------- the parser


def _add_geometry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=32, help="image side in pixels after resize/crop (default 32)")
    p.add_argument("--block", type=int, default=None, help="EtC block size in pixels (default: 16 colour, 8 gray)")
    p.add_argument("--scheme", choices=SCHEMES, default="color", help="colour EtC or grayscale-based EtC")


def _add_codec(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=CODECS, default="jpeg", help="stored image codec (default jpeg)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality 1-100 (default 85)")
    p.add_argument("--chroma", choices=tuple(CHROMA_SUBSAMPLING), default="420",
                   help="JPEG chroma subsampling of colour images (default 420)")


def _add_connection(p: argparse.ArgumentParser, server_help: str, required: bool = False) -> None:
    p.add_argument("--server", required=required, help=server_help + " (default: the joined profile's)")
    p.add_argument("--profile", default="default", help="the profile `owner-agent join` saved (default: default)")
    p.add_argument("--token-file", help="file holding your token (mode 0600); or set $OWNER_AGENT_TOKEN")
    p.add_argument("--ca-file", help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--client-cert", help="your client certificate (PEM), for mutual TLS")
    p.add_argument("--client-key", help="your client certificate's private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC; only to a loopback address")


class _DeprecatedFlag(argparse.Action):
    """An old flag that still works: says once what it means now, then sets ``dest``."""

    def __init__(self, *args, meaning: str, **kwargs) -> None:
        super().__init__(*args, nargs=0, **kwargs)
        self.meaning = meaning

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _log(f"owner-agent: {option_string} is deprecated: {self.meaning}")
        setattr(namespace, self.dest, True)


def _add_accept(p: argparse.ArgumentParser) -> None:
    """The flag that lets an owner send what the privacy verdict calls ``broken``. Per command on
    purpose: it is never saved (not in a profile, not in a key), so a new task, geometry or key mode
    shows its verdict and is refused again until the owner accepts that one."""
    p.add_argument(ACCEPT_FLAG, dest="accept_cloud_can_decrypt", action="store_true",
                   help="accept that a cloud running the published attacks can decrypt what this command sends: "
                        "go on although the privacy verdict for the task's settings is `broken` (docs/privacy.md). "
                        "For this command only; never saved")
    p.add_argument("--allow-weak-geometry", dest="accept_cloud_can_decrypt", action=_DeprecatedFlag,
                   default=False, help=argparse.SUPPRESS, meaning=f"it now means {ACCEPT_FLAG} (fewer than 4 "
                   "blocks is one of the settings the privacy verdict calls broken)")


def _add_upload(sub) -> None:
    p = sub.add_parser("upload", help="fetch the task, encrypt DIR and upload it (the default command)")
    p.add_argument("--key", help=KEY_HELP)
    p.add_argument("--data", required=True, help="image folder laid out as DIR/<class>/<image>")
    _add_connection(p, "ingest service HOST:PORT")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--plain", action="store_true", help="upload without encryption (plain baseline tasks)")
    p.add_argument("--outbox", help="where to keep the encrypted shards (default: under $OWNER_AGENT_HOME/outbox)")
    p.add_argument("--new-key-domain", action="store_true",
                   help="accept that this key differs from the one you uploaded with before")
    p.add_argument("--retries", type=int, default=8, help="attempts per step on transient failures (default 8)")
    p.add_argument("--max-rate", type=float, help="upload bandwidth cap in bytes/s (default: none)")
    p.add_argument("--shard-images", type=int, default=10_000, help="images per shard (default 10000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_accept(p)
    p.set_defaults(func=cmd_upload)


def _add_encrypt(sub) -> None:
    p = sub.add_parser("encrypt", help="encrypt an image folder into shards (an outbox)")
    p.add_argument("--key", help=KEY_HELP)
    p.add_argument("--data", required=True, help="image folder laid out as DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="outbox folder to write shards and manifest.json into")
    _add_geometry(p)
    _add_codec(p)
    p.add_argument("--plain", action="store_true", help="no encryption (a baseline); --key is then refused")
    p.add_argument("--per-image-keys", action="store_true",
                   help="encrypt every image under its own fresh random key, kept nowhere (no --key; for a task "
                        "with key_mode per-image, trained by strategy per-image-keys)")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--classes", help="comma-separated class list fixing label ids (default: sorted folder names)")
    p.add_argument("--shard-images", type=int, default=10_000, help="images per shard (default 10000)")
    p.add_argument("--max-bad-fraction", type=float, default=0.2,
                   help="stop when more than this fraction of files cannot be used (default 0.2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing outbox in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_accept(p)
    p.set_defaults(func=cmd_encrypt)


def _add_join(sub) -> None:
    p = sub.add_parser("join", help="check a cloud's ingest service and remember it (then: owner-agent --key K "
                                    "--data D)")
    p.add_argument("server", help="ingest service HOST:PORT")
    p.add_argument("--token-file", help="file holding your token (mode 0600); or set $OWNER_AGENT_TOKEN")
    p.add_argument("--ca-file", help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--client-cert", help="your client certificate (PEM), for mutual TLS")
    p.add_argument("--client-key", help="your client certificate's private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC; only to a loopback address")
    p.add_argument("--predict-server", help="the prediction service HOST:PORT (serve.listen), for predict")
    p.add_argument("--profile", default="default", help="name to save it under (default: default)")
    p.set_defaults(func=cmd_join)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images: encrypt locally, send to the prediction service")
    p.add_argument("--key", help="key name or key file (never created here)")
    p.add_argument("--plain", action="store_true", help="the model was trained on plain images")
    _add_connection(p, "prediction service HOST:PORT (serve.listen); not with --federated", required=False)
    p.add_argument("--federated", metavar="STATE_DIR",
                   help="predict here with a federated model: the folder `owner-agent federate` named when "
                        "it joined (final trunk + your adapter); nothing is sent anywhere")
    p.add_argument("--top", type=int, default=3, help="classes to print per image (default 3)")
    p.add_argument("--output", metavar="FILE", help="write the results to FILE (.csv or .json) instead of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively), any number")
    _add_accept(p)
    p.set_defaults(func=cmd_predict)


def _add_federate(sub) -> None:
    what = ("join a federated training: your data and your adapter stay here. Shows the task's privacy verdict but "
            "refuses nothing: no image leaves this machine, only model updates do")
    p = sub.add_parser("federate", help=what, description=what)
    p.add_argument("--key", required=True, help="key name or key file (never created here)")
    p.add_argument("--data", required=True, help="training images, DIR/<class>/<image>")
    p.add_argument("--test-data", help="test images evaluated each round (optional)")
    _add_connection(p, "ingest service HOST:PORT (for the task and your token)")
    p.add_argument("--flower", required=True, help="the orchestrator's Flower server HOST:PORT (federated.listen)")
    p.add_argument("--adapter-init", choices=("key", "learned"), default="key",
                   help="start your private adapter at your key's exact inverse (default) or learn it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--allow-weak-geometry", dest="accepted_nothing", action=_DeprecatedFlag, default=False,
                   help=argparse.SUPPRESS, meaning="federate refuses nothing (no image leaves this machine)")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("node-key", help="print the public key your SuperNode authenticates with (federated, TLS)")
    p.set_defaults(func=cmd_node_key)


def _add_local_tools(sub) -> None:
    p = sub.add_parser("decrypt", help="decrypt shards back into DIR/<class>/<id>.png")
    p.add_argument("--key", help=KEY_HELP + " (omit for --plain shards)")
    p.add_argument("--shards", required=True, help="folder with manifest.json and shards")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser("preview", help="one PNG: plain, encrypted and decrypted images side by side")
    p.add_argument("--key", required=True, help=KEY_HELP)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--count", type=int, default=8, help="number of images (rows)")
    _add_geometry(p)
    _add_codec(p)
    p.set_defaults(func=cmd_preview)


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="run the known attacks on your own images and key, here; verdict per attack")
    p.add_argument("--key", required=True, help="key name or key file (never created here)")
    p.add_argument("--data", required=True, help="your images, DIR/<class>/<image> (nothing is sent anywhere)")
    p.add_argument("--out", default="audit.png", help="PNG: plain | encrypted as uploaded | each attack's "
                                                      "reconstruction (default audit.png)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--images", default="30,100,1000", help="ciphertext-only: images the cloud holds, comma-separated "
                                                           "(capped by the folder; default 30,100,1000)")
    p.add_argument("--pairs", default="1,3", help="known plaintext: plain/encrypted pairs, comma-separated")
    p.add_argument("--per-image", type=int, default=20, help="images attacked one at a time (colour; default 20)")
    p.add_argument("--limit", type=int, default=1250, help="images read from --data; every fifth is held out as "
                                                           "the attacker's prior (default 1250)")
    p.add_argument("--prior", help="plain public images of the same kind as the attacker's prior (default: a "
                                   "fifth of --data, held out)")
    p.add_argument("--per-image-keys", action="store_true", help="audit the per-image-key strategy (task key_mode "
                   "per-image): each image under its own fresh random key, each attack scored per image")
    _add_geometry(p)
    _add_codec(p)
    p.set_defaults(func=cmd_audit)


def _add_keys(sub) -> None:
    p = sub.add_parser("keygen", help="create a key in the keyring (random, or from a passphrase)")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--passphrase-stdin", action="store_true", help="derive the key from a passphrase read from stdin")
    src.add_argument("--passphrase-file", help="derive the key from the first line of this file")
    p.add_argument("--salt", help="scrypt salt label for passphrase keys (default: the key name)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("keys", help="list keys in the keyring (names and key ids only)")
    p.set_defaults(func=cmd_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="owner-agent",
        description="Encrypt images locally with your own key (block-wise EtC) for training in an untrusted cloud.",
    )
    parser.add_argument("--version", action="version", version=f"owner-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_join, _add_upload, _add_encrypt, _add_predict, _add_federate, _add_local_tools, _add_audit,
                _add_keys):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
        argv = ["upload", *argv]  # `owner-agent --key K --data D --server S` is the upload command
    args = build_parser().parse_args(argv)
    # Images over Pillow's pixel limit are refused by load_rgb itself; Pillow's warning is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # A privacy product sends no telemetry: Flower reads this when it is first imported.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return args.func(args)
    except (OwnerError, ManifestError, TaskError, CodecError) as exc:
        print(f"owner-agent {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

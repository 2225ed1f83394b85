"""Errors are types: the cloud's refusals map to gRPC status codes by type, a task from a server
is validated like any other, and owner-agent prints every owner error as one line."""
import grpc
import pytest

from orchestrator import errors, rpc
from owners.cli import main
from protocol.proto import ingest_pb2 as pb
from protocol.task import Task, TaskError


@pytest.mark.parametrize("error, status", [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ModelNotTrainedForKey, grpc.StatusCode.FAILED_PRECONDITION),  # a subclass maps like its parent
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.DataCorrupted, grpc.StatusCode.DATA_LOSS),
    (errors.Busy, grpc.StatusCode.ABORTED),
    (errors.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
])
def test_status_follows_the_type_not_the_words(error, status):
    assert rpc.status_for(error("not trained on key id, not found, busy")) == status


def test_every_refusal_type_has_a_status():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in subclasses(errors.Refused):
        assert any(base in rpc.STATUS_BY_ERROR for base in cls.__mro__), cls


@pytest.mark.parametrize("fields, field", [
    ({"image_size": 40}, "image_size"),  # not a multiple of the block
    ({"image_size": 0}, "image_size"),
    ({"scheme": "rot13"}, "scheme"),
    ({"quality": 0}, "quality"),
    ({"format": "gif"}, "format"),
    ({"classes": ["a", "a"]}, "classes"),
])
def test_a_task_from_the_server_is_validated_like_any_other(fields, field):
    message = Task(("a", "b")).to_pb(pb, "run", "owner")
    for name, value in fields.items():
        if name == "classes":
            del message.classes[:]
            message.classes.extend(value)
        else:
            setattr(message, name, value)
    with pytest.raises(TaskError, match=f"task.{field}") as err:
        Task.from_pb(message)
    assert err.value.field == field


def test_a_task_round_trips_through_the_wire():
    task = Task(("cat", "dog"), image_size=64, block_size=8, scheme="gray", format="png", quality=90, chroma="444")
    assert Task.from_pb(task.to_pb(pb, "run", "me")) == task


def test_owner_errors_are_one_line_and_other_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    assert main(["encrypt", "--plain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"owner-agent encrypt: error: data folder {tmp_path / 'missing'} does not exist or is not a folder"]
    assert main(["preview", "--key", "k", "--data", str(tmp_path), "--out", str(tmp_path / "p.png"),
                 "--quality", "0"]) == 1
    assert "quality" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "home").exists() or not list((tmp_path / "home").rglob("k*"))  # no key made for nothing

"""Attacks on the product's own cipher, run by the owner on its own key (``owner-agent audit``).

Every attack here targets :mod:`owners.cipher` exactly (block order, rotation/flip,
negative-positive, channel shuffle; colour and gray schemes) and returns an estimated
:class:`owners.cipher.BlockSchedule`, which :mod:`owners.attacks.scoring` compares with the true
one and uses to decrypt:

    known_plaintext   M plain/encrypted pairs -> the schedule (block matching)
    ciphertext_only   N encrypted images of one key -> the schedule (pooled statistics + jigsaw)
    jigsaw            the placement solver over pooled border dissimilarities
    prior             the public natural-image prior an attacker is assumed to hold
    scoring           fraction of the schedule recovered, exact decryptions, SSIM, PSNR
"""

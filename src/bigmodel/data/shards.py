"""Token shard folders: where they live (a local folder or `s3://bucket/prefix`), their manifest,
and the checks a run makes before it trains from them.

A shard folder is litdata's optimized format (`index.json` plus `chunk-*.bin` files of token ids,
written by `litdata.optimize` with its `TokensLoader`), plus our `manifest.json`: the tokenizer
the ids come from, the source files with their sizes and modification times, the token dtype and
counts. `python -m bigmodel.prepare_data` writes both; `TextStreamDataModule` reads them.

Object storage is reached with boto3 as it configures itself from the environment (credentials,
`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, profiles). Nothing here logs or stores a credential.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bigmodel.errors import UserError

MANIFEST = "manifest.json"
INDEX = "index.json"  # litdata's
FORMAT = 1  # the manifest's own version


def litdata():
    """litdata, imported with its PyPI version check off.

    litdata (0.2.x) asks pypi.org for a newer release whenever a StreamingDataset or `optimize`
    starts: up to 30 s of waiting on a machine without the internet, a request a training job
    should not make, and a warning in every run. There is no setting for it; the check is one
    module function, answered here with "no newer version".
    """
    try:
        import litdata as ld
        import litdata.helpers
    except ImportError:
        raise UserError("token shards need litdata and boto3: pip install -e '.[stream]'") from None

    litdata.helpers._get_newer_version = lambda current: None
    return ld


def is_remote(path: str) -> bool:
    return str(path).startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b") (no trailing slash)."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise UserError(f"{url} is not an s3://bucket/prefix URL")
    return u.netloc, u.path.strip("/")


def s3_client():
    """A boto3 S3 client configured from the environment, failing fast when it cannot connect
    (litdata's own client retries for a long time: an unreachable bucket is refused first)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise UserError("s3:// paths need boto3: pip install -e '.[stream]'") from None

    return boto3.session.Session().client(
        "s3",
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
    )


def _s3_error(url: str, e: Exception) -> UserError:
    """One line for a failed request: what failed and what to check; never a credential."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
    if isinstance(e, NoCredentialsError):
        why = "no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    elif isinstance(e, EndpointConnectionError):
        why = f"cannot connect to {endpoint} (check AWS_ENDPOINT_URL and the network)"
    elif isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        why = {
            "NoSuchBucket": "the bucket does not exist",
            "NoSuchKey": "the object does not exist",
            "404": "it does not exist",
            "AccessDenied": "access denied for these credentials",
            "403": "access denied for these credentials",
            "InvalidAccessKeyId": "the access key is not known to the store",
            "SignatureDoesNotMatch": "the secret key does not match the access key",
        }.get(code, f"the store answered {code}")
    else:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return UserError(f"cannot read {url} at {endpoint}: {why}")


def read_json(folder: str, name: str, what: str) -> dict[str, Any]:
    """`folder/name` parsed, from disk or object storage; a UserError naming it otherwise."""
    if is_remote(folder):
        bucket, prefix = split_url(folder)
        key = f"{prefix}/{name}" if prefix else name
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise UserError(
                    f"{folder} holds no {name}: it is not a shard folder {what}"
                ) from None
            raise _s3_error(folder, e) from None
    else:
        f = Path(folder) / name
        if not Path(folder).is_dir():
            raise UserError(
                f"data.path={folder} does not exist; make it with "
                f"python -m bigmodel.prepare_data source=YOUR_TEXT out={folder}"
            )
        if not f.is_file():
            raise UserError(f"{folder} holds no {name}: it is not a shard folder {what}")
        body = f.read_bytes()
    try:
        return json.loads(body)
    except ValueError:
        raise UserError(f"{folder}/{name} is not valid JSON (cut short?); prepare again") from None


def read_manifest(folder: str) -> dict[str, Any]:
    m = read_json(folder, MANIFEST, "written by python -m bigmodel.prepare_data")
    if m.get("format") != FORMAT or not m.get("complete"):
        raise UserError(
            f"{folder} was not prepared to the end (its {MANIFEST} says incomplete); run the "
            "same python -m bigmodel.prepare_data command again to finish it"
        )
    return m


def object_sizes(folder: str) -> dict[str, int]:
    """name -> size in bytes of every file directly in the folder (or under the prefix)."""
    if not is_remote(folder):
        return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
    bucket, prefix = split_url(folder)
    base = f"{prefix}/" if prefix else ""
    sizes: dict[str, int] = {}
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(base) :]
                if "/" not in name:
                    sizes[name] = int(obj["Size"])
    except Exception as e:
        raise _s3_error(folder, e) from None
    return sizes


def check_shards(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and litdata's index of a shard folder, once every chunk it lists is there
    whole: a missing or cut-short chunk is named here, before training, not when it is read."""
    manifest = read_manifest(folder)
    index = read_json(folder, INDEX, "(litdata's index.json is missing)")
    chunks = index.get("chunks") or []
    if not chunks:
        raise UserError(f"{folder}/{INDEX} lists no chunks; prepare the shards again")
    sizes = object_sizes(folder)
    missing = [c["filename"] for c in chunks if c["filename"] not in sizes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"shard {missing[0]}{more} listed in {folder}/{INDEX} is missing; copy the whole "
            "folder again, or prepare it again"
        )
    for c in chunks:
        if sizes[c["filename"]] != c["chunk_bytes"]:
            raise UserError(
                f"shard {folder}/{c['filename']} is {sizes[c['filename']]} bytes where "
                f"{INDEX} says {c['chunk_bytes']}: it is corrupt or cut short; copy it again, or "
                "prepare the folder again"
            )
    if not is_remote(folder):  # a chunk's header holds its item count: a cheap sanity check
        for c in chunks:
            with open(Path(folder) / c["filename"], "rb") as f:
                head = f.read(4)
            if int.from_bytes(head, "little") != c["chunk_size"]:
                raise UserError(
                    f"shard {folder}/{c['filename']} has a corrupt header (it says "
                    f"{int.from_bytes(head, 'little')} items, {INDEX} says {c['chunk_size']}); "
                    "copy it again, or prepare the folder again"
                )
    return manifest, index


def tokens_in(index: dict[str, Any], window: int) -> tuple[int, int]:
    """(tokens, whole windows of `window` tokens) in the chunks of an index: litdata's
    TokensLoader cuts each chunk into windows and drops each chunk's remainder."""
    tokens = sum(int(c["dim"]) for c in index["chunks"])
    windows = sum(int(c["dim"]) // window for c in index["chunks"])
    return tokens, windows

"""Shards on a shared cluster: remote reads that fail for a moment are read again, every sample still delivered
once and in order; local files are not retried; gzip-compressed shards (.tar.gz, .tgz) are checked, counted, read.

A remote store is played by `pipe:sh flaky.sh ...`: a script that the test writes, which sends a shard's first bytes
and exits (with a failure status, or with 0 as a connection closed early would) for its first reads, then the whole
shard. It counts its reads of a shard in `<shard>.reads`.
"""
from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import re
import tarfile
import time
from pathlib import Path

import pytest

from crate_mae.config import ConfigError, DataConfig, load_config
from crate_mae.config.loading import config_help
from crate_mae.config.sections import STAGES
from crate_mae.data import EvalTransform, ShardError, eval_loader, read_manifest, resolve_shards, train_loader
from crate_mae.data.shards import main as shards_main
from crate_mae.data.stream import RETRY_CAP, _backoff, read_samples
from tests.helpers import good_sample, make_set, write_tar_set

T16 = EvalTransform(16, crop_pct=1.0)

FLAKY = """#!/bin/sh
# flaky.sh FAILS CUT CODE FILE [LATER]: the first FAILS reads of FILE send its first CUT bytes, then exit CODE;
# the later ones send all of LATER (default: FILE) and exit 0. Reads are counted in FILE.reads.
n=$(cat "$4.reads" 2>/dev/null || echo 0)
echo $((n + 1)) > "$4.reads"
if [ "$n" -lt "$1" ]; then head -c "$2" "$4"; exit "$3"; fi
exec cat "${5:-$4}"
"""


def flaky(tmp_path: Path, shard: str | Path, *, fails: int, cut: int, code: int = 1, later: str | Path = "") -> str:
    """A `pipe:` URL of `shard` whose first `fails` reads break after `cut` bytes with exit status `code`."""
    script = tmp_path / "flaky.sh"
    script.write_text(FLAKY)
    return f"pipe:sh {script} {fails} {cut} {code} {shard} {later}".rstrip()


def reads(shard: str | Path) -> int:
    """How many times flaky.sh was asked for `shard` (and forget it, so the next use fails again)."""
    counter = Path(f"{shard}.reads")
    n = int(counter.read_text()) if counter.exists() else 0
    counter.unlink(missing_ok=True)
    return n


def contents(samples) -> list[tuple[str, bytes, bytes]]:
    return [(s["__key__"], s["jpg"], s["cls"]) for s in samples]


def keys_of(loader) -> list[str]:
    return [k.rsplit("/", 1)[1] for batch in loader for k in batch.keys]


def cut_points(shard: Path) -> dict[str, int]:
    """Byte offsets at which a stream of `shard` (2 members per sample: .cls then .jpg) can break, by where."""
    members = list(tarfile.open(shard))
    jpg = members[3]
    return {"before its first byte": 0,
            "after a sample's first member": members[1].offset,  # the tar reader would give sample 0 without .jpg
            "between two samples": members[4].offset,
            "inside a header": members[4].offset + 100,
            "inside a member's data": jpg.offset_data + jpg.size // 2,
            "before the end-of-archive marker": members[-1].offset_data + 512,
            "late in the shard": members[10].offset}


# ---------------------------------------------------------------------------- remote shards: retried, exact

@pytest.mark.parametrize("code", [1, 0], ids=["then fails", "then exits 0"])
@pytest.mark.parametrize("where", ["before its first byte", "after a sample's first member", "between two samples",
                                   "inside a header", "inside a member's data", "before the end-of-archive marker",
                                   "late in the shard"])
def test_a_broken_read_is_read_again_and_every_sample_comes_once_in_order(tmp_path: Path, caplog, where: str,
                                                                          code: int) -> None:
    make_set(tmp_path, "train", n_shards=1, per_shard=6)
    shard = tmp_path / "train-000000.tar"
    unbroken = contents(read_samples([str(shard)], spec="s", shards=1))
    url = flaky(tmp_path, shard, fails=1, cut=cut_points(shard)[where], code=code)

    # The fault: without retries the broken read is a ShardError (before, a stream that ended with status 0 at a
    # member boundary just gave fewer samples, or a sample without its last members, and no error at all).
    with pytest.raises(ShardError, match=rf"^{re.escape(url)}: cannot read the shard \(.+\)$"):
        list(read_samples([url], spec="s", shards=1))
    assert reads(shard) == 1

    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        got = contents(read_samples([url], spec="s", shards=1, retries=2, wait=0.01))
    assert got == unbroken  # each sample once, whole, in the order of an unbroken read
    assert reads(shard) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "crate_mae.data"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{url}: reading the shard failed on attempt 1 of 3 (")
    if where == "late in the shard" and code == 0:  # the retry passed over samples the broken read had delivered
        # (with a failure status, webdataset's Pipe may raise at its first read, once the command has ended)
        assert int(re.search(r"passing over the (\d+) samples already delivered", warnings[0]).group(1)) >= 2


def test_a_shard_that_keeps_failing_is_one_line_naming_it_and_its_attempts(tmp_path: Path, caplog) -> None:
    make_set(tmp_path, "train", n_shards=1, per_shard=4)
    shard = tmp_path / "train-000000.tar"
    url = flaky(tmp_path, shard, fails=99, cut=3000)
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        with pytest.raises(ShardError) as err:
            list(read_samples([url], spec="s", shards=1, retries=2, wait=0.01))
    assert str(err.value) == f"{url}: cannot read the shard after 3 attempts (the command exited with status 1)"
    assert reads(shard) == 3
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "crate_mae.data"] == [
        f"{url}: reading the shard failed on attempt {n} of 3" for n in (1, 2)]


def test_the_waits_double_up_to_a_cap(tmp_path: Path) -> None:
    assert 0.5 <= _backoff(1, 1.0) <= 1.0 and 2.0 <= _backoff(3, 1.0) <= 4.0
    assert RETRY_CAP / 2 <= _backoff(30, 1.0) <= RETRY_CAP and _backoff(2, 0.0) == 0.0
    make_set(tmp_path, "train", n_shards=1, per_shard=2)
    url = flaky(tmp_path, tmp_path / "train-000000.tar", fails=99, cut=0)
    start = time.perf_counter()
    with pytest.raises(ShardError, match="after 3 attempts"):
        list(read_samples([url], spec="s", shards=1, retries=2, wait=0.1))
    assert time.perf_counter() - start >= 0.05 + 0.1  # at least half of 0.1 s, then half of 0.2 s


def test_local_shards_are_not_retried(tmp_path: Path, caplog) -> None:
    """A truncated local file stays truncated: one immediate ShardError, whatever data.read_retries says."""
    make_set(tmp_path, "train", n_shards=1, per_shard=4)
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "train-000000.tar").read_bytes()[:5000])
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "train-000000.tar").read_bytes())[:900])
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        for url in (str(cut), f"file://{cut}", str(gz)):
            with pytest.raises(ShardError, match=rf"^{re.escape(url)}: cannot read the shard \((EOFError|ReadError)"):
                list(read_samples([url], spec="s", shards=1, retries=5, wait=30.0))
    assert time.perf_counter() - start < 14  # a retry would first wait at least half of 30 s
    assert not [r for r in caplog.records if r.name == "crate_mae.data"]


def test_a_command_that_cannot_run_is_not_retried(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        with pytest.raises(ShardError, match=r"^pipe:no-such-command-for-crate-mae: cannot read the shard \(the "
                                             r"command exited with status 127 \(command not found\)\)$"):
            list(read_samples(["pipe:no-such-command-for-crate-mae"], spec="s", shards=1, retries=5, wait=30.0))
        with pytest.raises(ShardError, match=r"^nosuch://host/a\.tar: cannot read the shard \(ValueError: .*no "
                                             r"gopen handler"):
            list(read_samples(["nosuch://host/a.tar"], spec="s", shards=1, retries=5, wait=30.0))
    assert not [r for r in caplog.records if r.name == "crate_mae.data"]


def test_a_shard_that_changes_between_reads_is_named(tmp_path: Path) -> None:
    """Passing over the samples already delivered is only exact if the re-read is the same shard: it is checked."""
    make_set(tmp_path, "train", n_shards=1, per_shard=6)
    shard = tmp_path / "train-000000.tar"
    write_tar_set(tmp_path / "other", "train", [[good_sample(100 + i) for i in range(6)]], manifest=False)
    url = flaky(tmp_path, shard, fails=1, cut=cut_points(shard)["late in the shard"], code=0,
                later=tmp_path / "other" / "train-000000.tar")
    with pytest.raises(ShardError, match=r"read again after a failure, its sample \d+ is '0001\d\d', not '0000\d\d' "
                                         r"as before: the shard changed while it was read"):
        list(read_samples([url], spec="s", shards=1, retries=2, wait=0.01))
    assert reads(shard) == 2
    write_tar_set(tmp_path / "short", "train", [[good_sample(0)]], manifest=False)
    url = flaky(tmp_path, shard, fails=1, cut=cut_points(shard)["late in the shard"], code=0,
                later=tmp_path / "short" / "train-000000.tar")
    with pytest.raises(ShardError, match=r"it holds 1 samples, fewer than the \d+ already delivered"):
        list(read_samples([url], spec="s", shards=1, retries=2, wait=0.01))


def test_a_consumer_that_stops_early_ends_the_command(tmp_path: Path) -> None:
    """Training stops reading mid-shard at an epoch's end: the shard's command is ended, not waited for."""
    make_set(tmp_path, "train", n_shards=1, per_shard=6)
    samples = read_samples([f"pipe:cat {tmp_path}/train-000000.tar; exec sleep 60"], spec="s", shards=1, retries=2)
    start = time.perf_counter()
    assert next(samples)["__key__"] == "000000"
    samples.close()
    assert time.perf_counter() - start < 30  # not the minute the command would still take


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_over_flaky_remote_shards_deliver_every_sample_once(tmp_path: Path, workers: int) -> None:
    local = make_set(tmp_path, "train", n_shards=2, per_shard=6)
    shards = [tmp_path / f"train-{n:06d}.tar" for n in range(2)]
    spec = flaky(tmp_path, f"{tmp_path}/train-{{000000..000001}}.tar", fails=1, code=0,
                 cut=cut_points(shards[0])["late in the shard"])
    data = DataConfig(num_workers=workers, eval_crop_pct=1.0, read_retries=2, retry_wait=0.01)

    unbroken = keys_of(eval_loader(local, 16, data=data, batch_size=4))
    assert keys_of(eval_loader(spec, 16, data=data, batch_size=4)) == unbroken and len(unbroken) == 12
    assert [reads(s) for s in shards] == [2, 2]

    # 4 steps of 3: with 2 workers each reads 2 batches, one whole shard; with none, one reads both shards.
    loader = train_loader(spec, T16, data=data, batch_size=3, train_samples=12, resample=False, shuffle_buffer=0)
    assert len(loader) == 4 and sorted(keys_of(loader)) == sorted(unbroken)  # one epoch: each sample once
    assert [reads(s) for s in shards] == [2, 2]

    always = flaky(tmp_path, f"{tmp_path}/train-{{000000..000001}}.tar", fails=99, cut=0)
    with pytest.raises(ShardError) as err:
        list(eval_loader(always, 16, data=data, batch_size=4))
    assert re.fullmatch(r"pipe:.*train-00000[01]\.tar: cannot read the shard after 3 attempts \(the command exited "
                        r"with status 1\)", str(err.value))


def test_the_retry_settings_are_data_keys(tmp_path: Path) -> None:
    assert (DataConfig().read_retries, DataConfig().retry_wait) == (3, 1.0)
    with pytest.raises(ConfigError, match=r"^data\.read_retries: must be >= 0, got -1$"):
        DataConfig(read_retries=-1)
    with pytest.raises(ConfigError, match=r"^data\.retry_wait: must lie in \[0, 3600\] seconds, got -0\.5$"):
        DataConfig(retry_wait=-0.5)
    with pytest.raises(ConfigError, match=r"data\.read_retries: expected an integer, got 'many'"):
        load_config(None, ["data.read_retries=many"])
    for stage in STAGES:
        cfg = load_config(None, ["data.read_retries=5", "data.retry_wait=0.25"], stage=stage)
        assert (cfg.data.read_retries, cfg.data.retry_wait) == (5, 0.25)
        assert re.search(r"data\.read_retries\s+3 ", config_help(STAGES[stage]))
        assert re.search(r"data\.retry_wait\s+1\.0 ", config_help(STAGES[stage]))
    spec = make_set(tmp_path, "train", n_shards=1, per_shard=4)
    loader = train_loader(spec, T16, data=cfg.data, batch_size=2, num_workers=0)
    assert (loader.stream.data.read_retries, loader.stream.data.retry_wait) == (5, 0.25)


# ---------------------------------------------------------------------------- gzip-compressed shards

def gzip_set(folder: Path, suffix: str = ".tar.gz", n_shards: int = 2, per_shard: int = 5) -> list[Path]:
    """A set written by the helpers, each shard gzip-compressed to `<split>-NNNNNN<suffix>` (the .tar and the
    manifest removed)."""
    make_set(folder, "train", n_shards=n_shards, per_shard=per_shard)
    (folder / "train.json").unlink()
    paths = []
    for n in range(n_shards):
        tar = folder / f"train-{n:06d}.tar"
        paths.append(folder / f"train-{n:06d}{suffix}")
        paths[-1].write_bytes(gzip.compress(tar.read_bytes()))
        tar.unlink()
    return paths


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzip_shards_are_checked_counted_and_read(tmp_path: Path, capsys, suffix: str) -> None:
    make_set(tmp_path / "plain", "train", n_shards=2, per_shard=5)
    unbroken = [k for n in range(2) for k, _, _ in
                contents(read_samples([str(tmp_path / "plain" / f"train-{n:06d}.tar")], spec="s", shards=1))]
    paths = gzip_set(tmp_path / "gz", suffix)
    glob_spec = str(tmp_path / "gz" / f"train-*{suffix}")
    # Before: the pre-check took a gzip stream for a tar and said "not a complete tar file (no end-of-archive
    # marker): truncated?".
    assert resolve_shards(glob_spec).urls == [str(p) for p in paths]

    assert shards_main(["manifest", glob_spec]) == 0
    manifest = read_manifest(tmp_path / "gz" / "train.json")
    assert [(s.name, s.samples, s.bytes) for s in manifest.shards] == [(p.name, 5, p.stat().st_size) for p in paths]
    spec = str(tmp_path / "gz" / "train.json")
    assert shards_main(["manifest", "--verify", spec]) == 0
    assert shards_main(["check", spec]) == 0 and "10 samples, 0 bad" in capsys.readouterr().out

    data = DataConfig(num_workers=0, eval_crop_pct=1.0)
    assert keys_of(eval_loader(spec, 16, data=data, batch_size=4)) == unbroken
    brace = str(tmp_path / "gz" / f"train-{{000000..000001}}{suffix}")  # finds its sibling train.json
    assert resolve_shards(brace).total == 10
    assert sorted(keys_of(train_loader(brace, T16, data=data, batch_size=5, resample=False,
                                      shuffle_buffer=0))) == sorted(unbroken)


def test_a_truncated_gzip_shard_is_one_line_naming_it(tmp_path: Path) -> None:
    paths = gzip_set(tmp_path)
    whole, cut = paths[0].read_bytes(), len(paths[0].read_bytes()) // 2
    while int.from_bytes(whole[cut - 4:cut], "little") % 512 == 0:  # 1 cut in 512 ends like a whole tar's gzip (its
        cut += 1                                                    # size): the cheap pre-check leaves it to the reader
    paths[0].write_bytes(whole[:cut])
    with pytest.raises(ShardError, match=rf"^{re.escape(str(paths[0]))}: the gzip stream is cut short \(no "
                                         r"end-of-stream marker\): truncated\?$"):
        resolve_shards(str(tmp_path / "train-*.tar.gz"))
    with pytest.raises(ShardError, match=r"train-000000\.tar\.gz: cannot read the shard \(EOFError: Compressed file "
                                         r"ended before the end-of-stream marker was reached\)$"):
        list(read_samples([str(paths[0])], spec="s", shards=1))  # past the pre-check: the reader names it too
    paths[0].write_bytes(whole)
    assert shards_main(["manifest", str(tmp_path / "train-*.tar.gz")]) == 0
    paths[0].write_bytes(whole[:-10])  # with a manifest: its byte count
    with pytest.raises(ShardError, match=r"train-000000\.tar\.gz: \d+ bytes but the manifest says \d+: truncated"):
        resolve_shards(str(tmp_path / "train.json"))


def test_a_gzip_of_a_cut_tar_is_named_by_the_reader(tmp_path: Path) -> None:
    """A whole gzip stream of a tar cut at a member boundary passes the cheap pre-check (its length is a whole number
    of blocks); the reader, which decompresses it all, finds no end-of-archive marker."""
    make_set(tmp_path, "train", n_shards=1, per_shard=6)
    tar = tmp_path / "train-000000.tar"
    cut = tmp_path / "cut-000000.tar.gz"
    cut.write_bytes(gzip.compress(tar.read_bytes()[: cut_points(tar)["between two samples"]]))
    resolve_shards(str(cut))
    with pytest.raises(ShardError, match=r"cut-000000\.tar\.gz: cannot read the shard \(EOFError: the stream ended "
                                         r"after \d+ bytes without the tar's end-of-archive marker: cut short\?\)$"):
        list(read_samples([str(cut)], spec="s", shards=1))
    crc = tmp_path / "crc-000000.tar.gz"
    whole = gzip.compress(tar.read_bytes())
    crc.write_bytes(whole[:-8] + bytes(4) + whole[-4:])  # the trailer's CRC zeroed
    with pytest.raises(ShardError, match=r"crc-000000\.tar\.gz: cannot read the shard \(BadGzipFile: CRC check "
                                         r"failed"):
        list(read_samples([str(crc)], spec="s", shards=1))


@pytest.mark.parametrize("content, message", [
    (gzip.compress(b"hello, not a tar\n"), r"the gzip stream holds 17 bytes that are no complete tar"),
    (gzip.compress(b""), r"an empty gzip stream: it holds no tar"),
    (gzip.compress(bytes(10240)), r"the shard holds no samples \(an empty tar\)"),
    (b"\x1f\x8b" + bytes(range(256)) * 4, r"not a valid gzip stream \(BadGzipFile: .*\): corrupt\?"),
    (b"", r"not a complete tar file \(no end-of-archive marker\)"),
], ids=["gzip of text", "empty gzip", "gzip of an empty tar", "gzip magic then garbage", "empty file"])
def test_hostile_gzip_files_each_end_in_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-000000.tgz"
    path.write_bytes(content)
    with pytest.raises(ShardError, match=rf"^{re.escape(str(path))}: {message}") as err:
        resolve_shards(str(path))
    assert "\n" not in str(err.value)


def test_gzip_is_told_by_content_not_by_name(tmp_path: Path) -> None:
    """A plain tar named .tar.gz, and a gzip-compressed one named .tar, are each read as what they are."""
    make_set(tmp_path, "train", n_shards=1, per_shard=3)
    tar = tmp_path / "train-000000.tar"
    plain = tmp_path / "plain-000000.tar.gz"
    plain.write_bytes(tar.read_bytes())
    packed = tmp_path / "packed-000000.tar"
    packed.write_bytes(gzip.compress(tar.read_bytes()))
    for path in (plain, packed):
        resolve_shards(str(path))
        assert [k for k, _, _ in contents(read_samples([str(path)], spec="s", shards=1))] == ["000000", "000001",
                                                                                             "000002"]


@pytest.mark.parametrize("compress, kind", [(bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_the_other_compressions_webdataset_reads_are_checked_and_read_too(tmp_path: Path, compress, kind: str) -> None:
    """tarfile's "r|*" (webdataset's tar reader) also takes bzip2 and xz: the reader decompresses them itself to check
    the tar inside, so they must keep working (through a pipe too), and a cut one is named."""
    make_set(tmp_path, "train", n_shards=1, per_shard=3)
    data = compress((tmp_path / "train-000000.tar").read_bytes())
    path = tmp_path / "packed-000000.tar.x"
    path.write_bytes(data)
    resolve_shards(str(path))
    for url in (str(path), f"pipe:cat {path}"):
        assert [s["__key__"] for s in read_samples([url], spec="s", shards=1)] == ["000000", "000001", "000002"]
    path.write_bytes(data[:-20])
    with pytest.raises(ShardError, match=rf"packed-000000\.tar\.x: the {kind} stream is cut short"):
        resolve_shards(str(path))


def test_a_plain_tar_whose_first_member_looks_like_bzip2_is_a_plain_tar(tmp_path: Path) -> None:
    """A key such as "BZh9" begins like a bzip2 stream ("BZh" and a level digit): not enough to be taken for one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("BZh9.cls", "BZh9.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    path = tmp_path / "odd-000000.tar"
    path.write_bytes(buf.getvalue())
    resolve_shards(str(path))
    assert [s["__key__"] for s in read_samples([str(path)], spec="s", shards=1)] == ["BZh9"]


def test_a_remote_gzip_stream_cut_short_is_read_again(tmp_path: Path) -> None:
    paths = gzip_set(tmp_path, n_shards=1, per_shard=6)
    unbroken = contents(read_samples([str(paths[0])], spec="s", shards=1))
    url = flaky(tmp_path, paths[0], fails=1, cut=paths[0].stat().st_size * 2 // 3, code=0)
    assert contents(read_samples([url], spec="s", shards=1, retries=1, wait=0.01)) == unbroken
    assert reads(paths[0]) == 2


def test_the_manifest_command_refuses_remote_shards_in_one_line(tmp_path: Path, capsys) -> None:
    assert shards_main(["manifest", f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"]) == 1
    assert "the manifest command counts local shards" in capsys.readouterr().err

"""``protscale data prepare``: real FASTA files in tmp_path, run through the CLI and ``prepare()``."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from protscale.cli import main
from protscale.errors import UserError
from protscale.data import shards
from protscale.data.bundled import MAIN, OOD, bundled_path
from protscale.data.fasta import read_fasta
from protscale.data.packing import pack_tokens
from protscale.data.prepare import manifest_hash, mix_targets, n_val_for, prepare
from protscale.data.tokenizer import CLS, EOS, PAD, STANDARD_AMINO_ACIDS, encode, encode_many

AA = np.array(list(STANDARD_AMINO_ACIDS))


@pytest.fixture(autouse=True)
def _ray(ray_local):
    """prepare() runs on Ray Data: one real local Ray for the whole session."""


def rand_seqs(n: int, seed: int, lo: int = 30, hi: int = 200) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(AA, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def fasta_text(seqs, width: int = 60, prefix: str = "p") -> str:
    out = []
    for i, s in enumerate(seqs):
        out.append(f">{prefix}{i} some description\n")
        out.extend(s[j:j + width] + "\n" for j in range(0, len(s), width))
    return "".join(out)


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = main(["data", "prepare", "--quiet", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def decode_split(root: Path, split: str) -> list[bytes]:
    """Sequences (as upper-case residue bytes) recovered from the packed rows, checking row invariants."""
    rows = shards.read_split(root, split)
    stream = []
    for tok, lens in zip(rows.tokens, rows.seq_lens):
        n = int(lens.sum())
        assert (tok[n:] == PAD).all() and (tok[:n] != PAD).all(), "seq_lens must cover exactly the non-pad tokens"
        stream.append(tok[:n])
    flat = np.concatenate(stream) if stream else np.zeros(0, np.uint8)
    assert flat[0] == CLS and flat[-1] == EOS
    starts, ends = np.flatnonzero(flat == CLS), np.flatnonzero(flat == EOS)
    assert len(starts) == len(ends)
    from protscale.data.tokenizer import TOKENS
    return ["".join(TOKENS[t] for t in flat[a + 1:b]).encode() for a, b in zip(starts, ends)]


# ----------------------------------------------------------------------------------------- bad input
def test_empty_file_is_an_error(tmp_path, capsys):
    src = write(tmp_path / "empty.fasta", "")
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert "empty.fasta: empty file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_character_names_file_and_line(tmp_path, capsys):
    good = rand_seqs(30, 0)
    text = fasta_text(good[:2]) + ">bad\nMKVLA\nMKJLA\n" + fasta_text(good[2:], prefix="q")
    bad_line = fasta_text(good[:2]).count("\n") + 3
    src = write(tmp_path / "bad.fasta", text)
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert f"bad.fasta:{bad_line}:" in err and "'J'" in err and "column 3" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    # --on-invalid skip: the record is dropped, counted, and its location reported
    rc, out, err = main(["data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"),
                         "--on-invalid", "skip"]), *capsys.readouterr()
    assert rc == 0, err
    assert f"bad.fasta:{bad_line}:" in err and "skipped 1" in err
    m = shards.read_manifest(tmp_path / "out")
    s = m["sources"][0]
    assert s["records_rejected"] == 1 and s["records"] == 31 and s["rejected_by_kind"] == {"invalid character": 1}
    assert s["rejected_first"][0].endswith(f"bad.fasta:{bad_line}: " + s["rejected_first"][0].split(": ", 1)[1])
    assert m["totals"]["sequences"] == 30


@pytest.mark.parametrize("text,line,what", [
    (">a\nMKV\n>\nMKVL\n>c\nMKVLA\n", 3, "empty '>' line"),
    ("\nMKVL\n>a\nMKV\n", 2, "before the first '>' header"),
    (">a\nMKV\n>b\n>c\nMKVLA\n", 3, "empty sequence"),
    (">a\nMKV\n>b\nMK>V\n", 4, "'>' inside a sequence line"),
])
def test_malformed_records_name_file_and_line(tmp_path, capsys, text, line, what):
    src = write(tmp_path / "m.fa", text)
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert f"m.fa:{line}:" in err and what in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "directory", "corrupt-gzip", "truncated-gzip", "bzip2"])
def test_unreadable_inputs_get_one_line(tmp_path, capsys, kind):
    src = tmp_path / "x.fasta.gz"
    if kind == "directory":
        src.mkdir()
    elif kind == "corrupt-gzip":
        data = bytearray(gzip.compress(fasta_text(rand_seqs(200, 1)).encode()))
        data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
        src.write_bytes(bytes(data))
    elif kind == "truncated-gzip":
        src.write_bytes(gzip.compress(fasta_text(rand_seqs(200, 1)).encode())[:-100])
    elif kind == "bzip2":
        import bz2
        src.write_bytes(bz2.compress(b">a\nMKV\n"))
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "x.fasta.gz" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ reading, dedup
def test_multiline_records_rejoined(tmp_path):
    seqs = rand_seqs(20, 2, lo=1, hi=300)
    # mixed widths, lower case, CRLF, blank lines, trailing spaces
    text = ""
    for i, s in enumerate(seqs):
        w = 7 + i % 60
        lines = [s[j:j + w] for j in range(0, len(s), w)]
        text += f">r{i}\r\n" + "".join((ln.lower() if i % 2 else ln) + (" \r\n" if i % 3 else "\n\n") for ln in lines)
    p = write(tmp_path / "ml.fa", text)
    recs = list(read_fasta(p, chunk_size=97))  # tiny chunks: records straddle chunk boundaries
    assert [r.seq.decode() for r in recs] == seqs
    assert [r.id for r in recs] == [f"r{i}" for i in range(20)]
    assert recs[1].line == 2 + len(range(0, len(seqs[0]), 7)) * 2  # blank line after each line of record 0


def test_block_reader_matches_record_reader(tmp_path):
    """``read_fasta_blocks`` (array operations over whole blocks, what ``prepare`` reads with) yields the
    same sequences as the record-by-record ``read_fasta``, and reports the same problems at the same
    FILE:LINE, whether it skips them or stops, on random files full of edge cases and tiny chunks."""
    from protscale.data.fasta import FastaError, read_fasta_blocks

    rng = np.random.default_rng(7)
    seen = {"problems": 0, "errors": 0, "sequences": 0}
    alphabet = list(b"ACDEFGHIKLMNPQRSTVWYacdxXBUZO.-")
    headers = [b">id%d", b">", b"> spaced", b">id%d desc >x", b">\t", b">>id%d"]
    for trial in range(60):
        parts = [b"\n \n"] if trial % 7 == 0 else [b"junk\n"] if trial % 11 == 0 else []
        for k in range(int(rng.integers(0, 9))):
            hdr = headers[int(rng.integers(len(headers)))]
            body = bytes(rng.choice(alphabet, size=int(rng.integers(0, 60))).tolist())
            if rng.random() < 0.1:
                body += [b"1", b">", b"*", b"\xff", b" "][int(rng.integers(5))]
            width = int(rng.integers(3, 20))
            lines = [body[j:j + width] for j in range(0, len(body), width)]
            end = [b"\n", b"\r\n", b"\n\n", b""][int(rng.integers(4))]
            parts.append((hdr % k if b"%d" in hdr else hdr) + b"\n" + b"\n".join(lines) + end)
        path = write(tmp_path / f"f{trial}.fa", b"".join(parts), gz=trial % 2 == 1)
        for chunk in (5, 64, 1 << 20):
            for skip in (True, False):
                got = {}
                for reader in ("records", "blocks"):
                    problems, seqs = [], []
                    try:
                        if reader == "records":
                            seqs = [r.seq for r in read_fasta(path, problems.append if skip else None,
                                                              chunk_size=chunk)]
                        else:
                            blocks = read_fasta_blocks(path, problems.append if skip else None, chunk_size=chunk)
                            seqs = [s for blk in blocks for s in blk.seqs()]
                        err = None
                    except FastaError as exc:
                        err = str(exc)
                    got[reader] = (seqs, [str(p) for p in problems], err)
                assert got["blocks"] == got["records"], (b"".join(parts), chunk, skip)
                seqs, problems, err = got["records"]
                seen["sequences"] += len(seqs)
                seen["problems"] += len(problems)
                seen["errors"] += err is not None
    assert min(seen.values()) > 50, seen  # both the clean and the problem paths were exercised


def test_gzip_detected_by_magic_bytes(tmp_path):
    seqs = rand_seqs(150, 3)
    plain = write(tmp_path / "plain.fa", fasta_text(seqs))
    gz_no_ext = write(tmp_path / "compressed.fa", fasta_text(seqs), gz=True)  # gzip without .gz
    plain_gz_ext = write(tmp_path / "notreally.fa.gz", fasta_text(seqs))     # plain with .gz
    got = [[r.seq for r in read_fasta(p)] for p in (plain, gz_no_ext, plain_gz_ext)]
    assert got[0] == got[1] == got[2] == [s.encode() for s in seqs]
    m = prepare([gz_no_ext], tmp_path / "out", progress=False, val_min=10)
    assert m["sources"][0]["records"] == 150 and m["totals"]["sequences"] == 150


def test_duplicates_dropped_and_counted(tmp_path):
    a, b = rand_seqs(100, 4), rand_seqs(100, 5)
    src_a = write(tmp_path / "a.fa", fasta_text(a + a[:10] + [a[0].lower()]))  # 11 duplicates inside A
    src_b = write(tmp_path / "b.fa", fasta_text(b + a[20:25]), gz=True)        # 5 duplicates of A
    m = prepare([src_a, src_b], tmp_path / "out", progress=False, val_min=10)
    sa, sb = m["sources"]
    assert (sa["records"], sa["duplicates_dropped"], sa["unique_records"]) == (111, 11, 100)
    assert (sb["records"], sb["duplicates_dropped"], sb["unique_records"]) == (105, 5, 100)
    assert m["totals"]["duplicates_dropped"] == 16
    written = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    # (equal weights: the source with more residues is downsampled a little)
    assert len(written) == len(set(written)) == sa["records_used"] + sb["records_used"] > 150
    assert set(written) <= {s.encode() for s in a + b}


# ----------------------------------------------------------------------------------- mixing, splits
def test_mixing_weights_honoured(tmp_path):
    a, b, c = rand_seqs(600, 6), rand_seqs(300, 7), rand_seqs(300, 8)
    pa_, pb, pc = (write(tmp_path / f"{n}.fa", fasta_text(s)) for n, s in (("a", a), ("b", b), ("c", c)))
    m = prepare([f"{pa_}:1", f"{pb}:3", f"{pc}:0"], tmp_path / "out", progress=False, val_fraction=0.02,
                val_min=0)
    sa, sb, sc = m["sources"]
    train = m["splits"]["train"]["residues"]
    assert sa["train_residues"] + sb["train_residues"] == train and sc["train_residues"] == 0
    assert abs(sb["train_residues"] / train - 0.75) < 0.01, (sa, sb)
    assert abs(sa["train_residues"] / train - 0.25) < 0.01
    # the scarcer source (relative to its weight) is used in full; the other is downsampled, no repeats
    assert sb["residues_used"] == sb["unique_residues"] and sb["residues_dropped_by_mixing"] == 0
    assert 0 < sa["residues_used"] < sa["unique_residues"]
    assert sa["residues_used"] + sa["residues_dropped_by_mixing"] == sa["unique_residues"]
    assert sc["residues_used"] == 0 and sc["residues_dropped_by_mixing"] == sc["unique_residues"]
    written = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    assert len(written) == len(set(written)) and not set(written) & {s.encode() for s in c}
    assert mix_targets([100, 50], [1, 1]) == [50.0, 50.0]
    assert mix_targets([100, 50], [3, 1]) == [100.0, 100 / 3]


def test_split_sizes(tmp_path):
    seqs, ood = rand_seqs(500, 9), rand_seqs(60, 10)
    src = write(tmp_path / "s.fa", fasta_text(seqs))
    ood_src = write(tmp_path / "ood.fa", fasta_text(ood + seqs[:7], prefix="o"), gz=True)
    m = prepare([src], tmp_path / "with", ood=ood_src, val_fraction=0.1, val_min=0, progress=False, seq_len=128)
    sp = m["splits"]
    assert (sp["train"]["sequences"], sp["val"]["sequences"], sp["test"]["sequences"]) == (450, 50, 60)
    assert m["ood"]["method"] == "source" and m["ood"]["overlap_with_sources_dropped"] == 7
    test = decode_split(tmp_path / "with", "test")
    assert set(test) == {s.encode() for s in ood}
    assert not set(test) & set(decode_split(tmp_path / "with", "train"))
    for name, v in sp.items():
        rows = shards.read_split(tmp_path / "with", name)
        assert v["rows"] == len(rows) and v["tokens"] == rows.n_tokens == v["residues"] + 2 * v["sequences"]
        assert v["files"] == [f"{name}/part-00000.parquet"]

    # no OOD source, no mmseqs: no test split, and the manifest says so; val_min applies
    m = prepare([src], tmp_path / "without", progress=False)
    assert set(m["splits"]) == {"train", "val"} and m["ood"]["method"] == "none"
    assert not (tmp_path / "without" / "test").exists()
    assert m["splits"]["val"]["sequences"] == 50  # max(1% of 500, min(100, 500 // 10))
    assert [n_val_for(n, 0.01, 100) for n in (0, 1, 2, 20, 3000, 100_000)] == [0, 0, 1, 2, 100, 1000]


def test_ood_clusters_need_mmseqs(tmp_path, monkeypatch, capsys):
    src = write(tmp_path / "s.fa", fasta_text(rand_seqs(50, 11)))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out", "--ood-clusters", "0.1"], capsys)
    assert rc == 2 and "mmseqs" in err and not (tmp_path / "out").exists()


def protein_families(n_families: int, variants: int, seed: int) -> list[list[str]]:
    """Real proteins (the bundled UniProt sample), each with ``variants`` copies carrying 3% substitutions:
    a family that any sequence-identity clustering at 50% keeps together."""
    rng = np.random.default_rng(seed)
    real = [r.seq.decode() for r in read_fasta(MAIN) if 80 <= len(r.seq) <= 400][:n_families]
    fams = []
    for s in real:
        fam = [s]
        for _ in range(variants):
            v = np.array(list(s))
            at = rng.choice(len(s), size=max(1, len(s) * 3 // 100), replace=False)
            v[at] = rng.choice(AA, size=at.size)
            fam.append("".join(v))
        fams.append(fam)
    return fams


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="needs mmseqs (apt-get install mmseqs2; .ci/run does)")
def test_ood_clusters_hold_out_whole_clusters(tmp_path):
    """The real ``mmseqs easy-cluster`` on real proteins: families never straddle test and train."""
    fams = protein_families(150, 2, 12)
    src = write(tmp_path / "s.fa", fasta_text([s for f in fams for s in f]))
    m = prepare([src], tmp_path / "out", ood_clusters=0.2, progress=False, val_min=10)
    ood = m["ood"]
    assert ood["method"] == "clusters" and ood["tool"] == "mmseqs easy-cluster"
    assert 100 <= ood["clusters"] <= 150 * 3  # at least the families are clusters; nothing left unclustered
    test = decode_split(tmp_path / "out", "test")
    rest = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    family_of = {s.encode(): i for i, f in enumerate(fams) for s in f}
    split_families = {family_of[s] for s in test} & {family_of[s] for s in rest}
    assert not split_families, f"families split between test and train/val: {sorted(split_families)[:5]}"
    assert len(test) + len(rest) == 450 and len(set(test + rest)) == 450
    frac = sum(map(len, test)) / sum(map(len, test + rest))
    assert 0.2 <= frac < 0.3 and abs(frac - ood["residues_held_out_fraction"]) < 1e-6
    s = m["sources"][0]
    assert s["held_out_ood_records"] == len(test) and s["unique_records"] == 450


# ----------------------------------------------------------------------------- output, round trip
def test_no_output_left_behind_on_failure(tmp_path, capsys):
    """A run that fails after work was written (the second file's last record is bad, so the first file's
    buckets are already on disk) leaves neither the dataset nor its temporary directory."""
    src = write(tmp_path / "s.fa", fasta_text(rand_seqs(100, 13)))
    late = write(tmp_path / "late.fa", fasta_text(rand_seqs(300, 16), prefix="l") + ">broken\nMK1V\n")
    with pytest.raises(UserError, match=r"late\.fa:\d+: invalid character '1'"):
        prepare([src, late], tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.fa", "s.fa"]  # no out, no temporary sibling

    # an existing output is refused without --overwrite and replaced with it
    rc, _, _ = run_cli(["--source", src, "--out", tmp_path / "out"], capsys)
    assert rc == 0
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out", "--seed", "1"], capsys)
    assert rc == 2 and "--overwrite" in err
    assert shards.read_manifest(tmp_path / "out")["settings"]["seed"] == 0
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "out", "--seed", "1", "--overwrite"], capsys)
    assert rc == 0, err
    assert shards.read_manifest(tmp_path / "out")["settings"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.fa", "out", "s.fa"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    rc, _, err = run_cli(["--source", src, "--out", tmp_path / "precious", "--overwrite"], capsys)
    assert rc == 2 and (tmp_path / "precious" / "notes.txt").exists()


def test_packed_rows_round_trip(tmp_path):
    seqs = rand_seqs(300, 14, lo=1, hi=400) + ["MKVXBUZOA", "mk-v.a"]
    src = write(tmp_path / "s.fa", fasta_text(seqs))
    m = prepare([src], tmp_path / "out", seq_len=64, progress=False, val_min=20)
    train = decode_split(tmp_path / "out", "train")
    val = decode_split(tmp_path / "out", "val")
    assert sorted(train + val) == sorted(s.upper().encode() for s in seqs)
    rows = shards.read_split(tmp_path / "out", "train")
    assert rows.seq_len == 64 and all(int(s.sum()) <= 64 for s in rows.seq_lens)
    assert rows.n_tokens == sum(len(s) + 2 for s in train) == m["splits"]["train"]["tokens"]
    # every segment boundary is a sequence boundary or a row boundary, and every sequence's tokens appear
    flat = np.concatenate([t[:int(s.sum())] for t, s in zip(rows.tokens, rows.seq_lens)])
    ends = np.cumsum(np.concatenate(rows.seq_lens))
    seq_ends = set(np.flatnonzero(flat == EOS) + 1)
    row_ends = set(np.cumsum([int(s.sum()) for s in rows.seq_lens]))
    assert set(ends) <= seq_ends | row_ends and seq_ends <= set(ends)
    # the one tokeniser/packer (bulk, array operations) equals a plain loop over encode()
    raw = [s.upper().encode() for s in seqs]
    got = pack_tokens(*encode_many(raw), 37)
    stream = [t for s in seqs for t in encode(s)]
    ref_rows = [stream[i:i + 37] for i in range(0, len(stream), 37)]
    assert np.array_equal(got.tokens[:-1], np.array(ref_rows[:-1], dtype=np.uint8))
    assert list(got.tokens[-1][:len(ref_rows[-1])]) == ref_rows[-1] and (got.tokens[-1][len(ref_rows[-1]):] == PAD).all()
    bounds, at = [], 0
    for s in seqs:  # segment ends: sequence ends and row ends
        at += len(s) + 2
        bounds.append(at)
    cuts = sorted(set(bounds) | set(range(37, len(stream), 37)))
    assert np.array_equal(np.cumsum(np.concatenate(got.seq_lens)), cuts)
    assert np.array_equal(shards.pack([encode(s) for s in seqs], 37).tokens, got.tokens)


def test_manifest_hash_stable_and_sensitive(tmp_path):
    seqs = rand_seqs(200, 15)
    src = write(tmp_path / "s.fa", fasta_text(seqs))
    m1 = prepare([src], tmp_path / "o1", progress=False)
    m2 = prepare([src], tmp_path / "o2", progress=False)
    on_disk = json.loads((tmp_path / "o1" / shards.MANIFEST).read_text())
    assert m1["hash"] == m2["hash"] == on_disk["hash"] == manifest_hash(on_disk)
    assert on_disk["sources"][0]["sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    for split in ("train", "val"):  # same seed, same rows
        assert np.array_equal(shards.read_split(tmp_path / "o1", split).tokens,
                              shards.read_split(tmp_path / "o2", split).tokens)
    m3 = prepare([src], tmp_path / "o3", progress=False, seed=1)
    assert m3["hash"] != m1["hash"]
    assert not np.array_equal(shards.read_split(tmp_path / "o1", "val").tokens,
                              shards.read_split(tmp_path / "o3", "val").tokens)
    seqs[17] = seqs[17][:-1] + ("A" if seqs[17][-1] != "A" else "C")  # one residue differs
    src2 = write(tmp_path / "s2.fa", fasta_text(seqs))
    src.unlink()
    src2.rename(src)  # same path, different bytes
    assert prepare([src], tmp_path / "o4", progress=False)["hash"] != m1["hash"]


def test_bundled_demo_data(tmp_path, capsys):
    assert bundled_path("main") == MAIN and bundled_path("ood") == OOD
    assert MAIN.stat().st_size + OOD.stat().st_size < 2_000_000
    assert "CC BY 4.0" in (MAIN.parent / "README.md").read_text()
    with pytest.raises(FileNotFoundError):
        bundled_path("nope.fasta")
    rc, out, err = run_cli(["--demo", "--out", tmp_path / "demo", "--seq-len", "256"], capsys)
    assert rc == 0, err
    assert "prepared" in out and len(out.strip().splitlines()) == 1
    m = shards.read_manifest(tmp_path / "demo")
    assert m["sources"][0]["path"] == f"bundled:{MAIN.name}" and m["sources"][0]["records"] == 6000
    assert m["ood"]["method"] == "source" and m["splits"]["test"]["sequences"] > 300
    assert m["splits"]["val"]["sequences"] == 100 and m["seq_len"] == 256 and m["tokenizer"] == "esm2"
    with pytest.raises(UserError, match="--ood and --ood-clusters"):
        prepare([MAIN], tmp_path / "x", ood=OOD, ood_clusters=0.1)


def test_buckets_bound_the_work_of_each_task(tmp_path):
    """Hash partitioning sizes the buckets from the input, so the rows one task de-duplicates, packs and
    writes stay near ``rows_per_shard`` however large the corpus (the memory figures are in
    benchmarks/data_prepare.py); every bucket becomes one train shard, listed with its rows."""
    m = prepare([MAIN], tmp_path / "out", seq_len=128, rows_per_shard=512, progress=False)
    train = m["splits"]["train"]
    rows = [s["rows"] for s in train["shards"]]
    assert m["settings"]["buckets"] == len(rows) >= 20 and sum(rows) == train["rows"]
    assert max(rows) <= 2 * 512 and min(rows) >= 512 // 4, rows
    assert [s["file"] for s in train["shards"]] == train["files"] == sorted(train["files"])
    reader = shards.SplitReader(tmp_path / "out", "train")
    assert reader.n_rows == train["rows"] and reader.block_rows <= 1024


def test_shuffle_partitions_stay_bounded_up_to_the_paper_corpus():
    """De-duplication's hash shuffle grows its partitions with the corpus, so one task's share of the
    records stays bounded from the demo to the paper's 194B tokens, and its pieces (map tasks x partitions,
    each an object the driver owns) stay within what one Ray driver holds."""
    from protscale.data import prepare as p

    for residues in (6e5, 2.3e7, 1.9e8, 1.94e11):
        n_buckets = p._n_buckets(residues, 1024, 8192)
        parts, map_bytes = p._shuffle_sizes(residues, n_buckets, cpus=2)
        records = residues * p.RECORD_BYTES_PER_RESIDUE
        assert 1 <= parts <= n_buckets + 1
        assert records / parts <= 128 << 20, (residues, parts)       # one de-duplication task's input
        if residues <= 1.9e8:       # up to the shared corpus (8 shards): the same small share at every size
            assert records / parts <= 10 << 20 and map_bytes == p.MAP_BYTES[0], (residues, parts, map_bytes)
        assert map_bytes <= 1 << 30 and (records / map_bytes) * parts <= 600_000


def test_shards_are_fixed_width_token_rows(demo_data, tmp_path):
    """Format 3 stores each row's tokens as one fixed-size binary value; the reader also reads format 2
    (list<uint8>) shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(demo_data, tmp_path / "out")
    m = shards.read_manifest(tmp_path / "out")
    assert m["format_version"] == 3 and m["seq_len"] == 128
    f = tmp_path / "out" / m["splits"]["train"]["files"][0]
    assert pq.read_schema(f).field("tokens").type == pa.binary(128)
    new = shards.read_split(tmp_path / "out", "train")
    for name in m["splits"]["train"]["files"]:                 # rewrite as format 2 in place
        t = pq.read_table(tmp_path / "out" / name)
        flat = np.frombuffer(t["tokens"].combine_chunks().buffers()[1], np.uint8, count=t.num_rows * 128)
        tokens = pa.ListArray.from_arrays(pa.array(np.arange(0, (t.num_rows + 1) * 128, 128, dtype=np.int32)),
                                          pa.array(flat, pa.uint8()))
        pq.write_table(pa.table({"tokens": tokens, "seq_lens": t["seq_lens"]}), tmp_path / "out" / name)
    old = shards.read_split(tmp_path / "out", "train")
    assert np.array_equal(old.tokens, new.tokens)
    assert all(np.array_equal(a, b) for a, b in zip(old.seq_lens, new.seq_lens))

#!/usr/bin/env python3
"""Prepare the code corpus for the default bitdlm model (runs on our machine, offline).

Sources (read where the interpreter and pip put them; nothing is downloaded):
- every `.py` file of CPython's standard library as it ships with the
  interpreter (including test/, excluding site-packages): PSF-licensed;
- with `--packages` (the default for the GPU model, issue 26): the `.py` files
  of the installed distributions the project itself needs -- the dependency
  closure of pyproject.toml's dependencies and its `test`, `bench` and `ray`
  extras -- whose dist-info metadata declares a permissive license (MIT, BSD,
  Apache-2.0, PSF, ISC and the like: PERMISSIVE). A package whose license is
  unknown or copyleft (GPL, LGPL, MPL, ...) is skipped, and so is every
  package not installed. The manifest (`--manifest`, committed as
  docs/tiny_model_corpus.json) lists each package's name, version, license
  text as read, the decision and the files/bytes/tokens kept.

A fixed list of whole stdlib modules (HELDOUT_MODULES: the module and its
test/test_<name>.py) is held out for evaluation and never trained on -- not
even by the tokenizer; a training file that is a near-duplicate of a held-out
file (a vendored copy of `textwrap`, say) is dropped too.

Dropped: files that are not UTF-8 or do not parse; the generated codec tables
of encodings/; vendored code (a path through `_vendor`, `third_party`,
`thirdparty*`, `extern`, ...: other projects' code under other licenses);
generated files (a "generated ... do not edit" header in the first lines,
`*_pb2.py`); data-like files (a line over 1000 characters or a mean line over
120); exact duplicates (same text up to trailing whitespace) and
near-duplicates (MinHash over 5-token shingles, Jaccard >= NEAR_DUP_JACCARD):
the first file in corpus order (stdlib, then packages by name) is kept.

Tokenizer: byte-level BPE (`tokenizers`) trained on the training split only.
The pre-tokenizer first isolates every newline + indentation run ("\\n" and the
spaces/tabs after it) so that "\\n    ", "\\n        ", ... become single cheap
tokens, then applies the GPT-2 byte-level split (which keeps inner runs of
spaces together). Specials: `<|endoftext|>` (id 0: BOS/EOS/pad, also the
document separator) and `<|mask|>` (id 1).

Output (default build-train/data/, git-ignored, carried to the GPU machine):
  train_tokens.npy / heldout_tokens.npy  uint16 token stream, each document
                                          preceded by <|endoftext|> and the
                                          stream ending with one
  train_docs.npy / heldout_docs.npy      int64: position of the <|endoftext|>
                                          that precedes each document
  tokenizer.json, meta.json              (meta: file lists, counts, held-out modules)
With `--pack FILE`: the same folder as one xz-compressed tar (the token
streams compress far better there than the text would re-tokenized), the
form that travels to the GPU machine (scripts/train_gpu.sh unpacks it).

    python3 scripts/prepare_code_data.py --packages --out build-train/data \\
        --manifest docs/tiny_model_corpus.json --pack build-train/carry/data.tar.xz
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import re
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

EOT = "<|endoftext|>"
MASK = "<|mask|>"

STDLIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The extras whose packages the project installs for its own use (tests, bench, Ray).
EXTRAS = ("test", "bench", "ray")

# Whole modules held out for evaluation (module file or package, plus its test
# file test/test_<name>.py or test package): small-to-mid pure-Python modules
# full of documented functions, so held-out function completions can be drawn.
HELDOUT_MODULES = """bisect calendar colorsys difflib filecmp fileinput fnmatch fractions getopt glob
graphlib heapq netrc pprint quopri reprlib sched shlex statistics textwrap""".split()

# Newline followed by its indentation: one pre-token (ByteLevel's GPT-2 split
# would otherwise cut "\n    def" into "\n   " + " def").
INDENT_RUN = r"\n[ \t]*"

# SPDX ids / license names accepted (permissive). Anything else, or nothing, is skipped.
PERMISSIVE = {
    "mit", "mit-cmu", "mit-0", "isc", "0bsd", "bsd", "bsd-2-clause", "bsd-3-clause", "apache",
    "apache-2.0", "apache 2.0", "psf", "psf-2.0", "python-2.0", "cnri-python", "zlib", "cc0-1.0",
    "bsl-1.0", "llvm-exception", "unlicense", "hpnd",
}
COPYLEFT = re.compile(r"\b(A?GPL|LGPL|MPL|EPL|EUPL|CDDL|OSL|copyleft|GNU)", re.I)
# License classifiers (the part after "License :: OSI Approved :: ") that are permissive.
PERMISSIVE_CLASSIFIER = re.compile(
    r"^(MIT|BSD|Apache|Python Software Foundation|ISC|zlib|The Unlicense|Historical Permission)", re.I)

VENDORED_DIRS = {"_vendor", "vendor", "vendored", "_vendored", "third_party", "_third_party",
                 "thirdparty", "_thirdparty", "externals", "extern", "_extern"}
GENERATED = re.compile(r"(auto-?generated|automatically generated|generated by|do not edit|"
                       r"code generated|generated from)", re.I)
NEAR_DUP_JACCARD = 0.8
N_PERM, N_BANDS = 128, 16  # MinHash: 16 bands of 8 rows (P(candidate | J = 0.8) ~ 0.95)
SHINGLE = 5
WORD = re.compile(r"\w+|[^\w\s]")


def is_heldout(rel: Path) -> bool:
    parts = rel.parts
    stem = rel.stem if len(parts) == 1 else parts[0]
    if stem in HELDOUT_MODULES:
        return True
    if parts[0] == "test" and len(parts) >= 2:
        name = Path(parts[1]).stem
        return name.startswith("test_") and name[len("test_"):] in HELDOUT_MODULES
    return False


# ----------------------------------------------------------------------------- licenses / packages

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _permissive_term(term: str) -> bool:
    """One SPDX term ("MIT", "Apache-2.0 WITH LLVM-exception") or a loose name ("3-Clause BSD License")."""
    t = term.strip(" ()").lower()
    if not t or COPYLEFT.search(t):
        return False
    return t.split()[0] in PERMISSIVE or re.search(r"\b(bsd|mit|apache|isc|psf)\b", t) is not None


def classify_license(meta) -> tuple[bool, str]:
    """(permissive?, license as read) from a dist-info METADATA mapping
    (`License-Expression`, else the license classifiers, else the first line
    of `License`). Unknown or copyleft -> False."""
    expr = (meta.get("License-Expression") or "").strip()
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or [])
                   if c.startswith("License ::")]
    text = (meta.get("License") or "").strip()
    first = text.splitlines()[0].strip() if text else ""
    if expr:
        label = expr
        # every AND-term must be permissive; one permissive alternative of an OR-term suffices
        terms = [t.strip(" ()") for t in re.split(r"\s+AND\s+", expr, flags=re.I)]
        ok = all(any(_permissive_term(a) for a in re.split(r"\s+OR\s+", t, flags=re.I)) for t in terms)
        return ok, label
    if classifiers:
        label = "; ".join(classifiers)
        ok = all(PERMISSIVE_CLASSIFIER.match(c) and not COPYLEFT.search(c) for c in classifiers)
        return ok, label
    if first:
        label = first[:80]
        ok = not COPYLEFT.search(text[:2000]) and _permissive_term(first)
        return ok, label
    return False, "unknown"


def project_closure(pyproject: Path = PYPROJECT, extras=EXTRAS):
    """Installed distributions the project needs (its dependencies and the
    given extras, transitively, markers evaluated here), sorted by name, and
    the requirement names that are not installed."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    proj = tomllib.loads(pyproject.read_text())["project"]
    roots = list(proj.get("dependencies", []))
    for e in extras:
        roots += proj.get("optional-dependencies", {}).get(e, [])
    stack = [Requirement(r) for r in roots]
    found: dict[str, tuple] = {}
    missing: set[str] = set()
    while stack:
        req = stack.pop()
        key = _norm(req.name)
        if key == "bitdlm":
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.add(key)
            continue
        have = found.get(key, (None, set()))[1]
        if key in found and set(req.extras) <= have:
            continue
        ex = have | set(req.extras)
        found[key] = (dist, ex)
        for r in dist.requires or []:
            sub = Requirement(r)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ex | {""}):
                stack.append(sub)
    return [found[k][0] for k in sorted(found)], sorted(missing)


# ----------------------------------------------------------------------------- files and filters

def _vendored(rel: Path) -> bool:
    return any(p in VENDORED_DIRS or p.startswith("thirdparty") for p in rel.parts[:-1])


def _generated(rel: Path, text: str) -> bool:
    if rel.name.endswith(("_pb2.py", "_pb2_grpc.py")):
        return True
    return GENERATED.search("\n".join(text.splitlines()[:30])) is not None


def _data_like(text: str) -> bool:
    lines = text.splitlines() or [""]
    return max(map(len, lines)) > 1000 or len(text) / len(lines) > 120


def _read_source(path: Path, rel: Path, dropped: dict, source_filters: bool):
    """The file's normalised text, or None (and a drop counted)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        dropped["not_utf8"] += 1
        return None
    if rel.parts[0] == "encodings" and "Python Character Mapping Codec" in text[:400]:
        dropped["codec_table"] += 1
        return None
    if source_filters:
        if _vendored(rel):
            dropped["vendored"] += 1
            return None
        if _generated(rel, text):
            dropped["generated"] += 1
            return None
    if _data_like(text):
        dropped["data_like"] += 1
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        dropped["no_parse"] += 1
        return None
    text = text.replace("\r\n", "\n").strip("\n") + "\n"
    return text if text.strip() else None


def _new_dropped():
    return {"not_utf8": 0, "no_parse": 0, "codec_table": 0, "vendored": 0, "generated": 0,
            "data_like": 0, "exact_dup": 0, "near_dup": 0, "near_dup_of_heldout": 0}


def collect_files(root: Path, dropped: dict | None = None):
    """Sorted (relative path, text) of the usable stdlib .py files, and the drop counts."""
    dropped = _new_dropped() if dropped is None else dropped
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("site-packages", "__pycache__"):
            continue
        text = _read_source(p, rel, dropped, source_filters=False)
        if text is not None:
            files.append((rel.as_posix(), text))
    return files, dropped


def collect_packages(dists, dropped: dict):
    """(files, manifest): the .py files of each permissively licensed
    distribution (named "<package>/<path in site-packages>") and one manifest
    row per distribution."""
    files, manifest = [], []
    for dist in dists:
        ok, label = classify_license(dist.metadata)
        row = {"name": dist.metadata["Name"], "version": dist.version, "license": label,
               "used": ok, "files": 0, "bytes": 0}
        manifest.append(row)
        if not ok:
            continue
        pkg = _norm(dist.metadata["Name"])
        for f in sorted(str(x) for x in (dist.files or [])):
            if not f.endswith(".py") or f.startswith("..") or "__pycache__" in f:
                continue
            path = Path(dist.locate_file(f))
            if not path.is_file():
                continue
            text = _read_source(path, Path(f), dropped, source_filters=True)
            if text is not None:
                files.append((f"{pkg}/{f}", text))
    return files, manifest


def _word_ids(text: str, cache: dict) -> "np.ndarray":
    import numpy as np

    out = []
    for w in WORD.findall(text):
        h = cache.get(w)
        if h is None:
            h = cache[w] = zlib.crc32(w.encode()) | (zlib.adler32(w.encode()) << 32)
        out.append(h)
    return np.array(out, dtype=np.uint64)


def minhash_signatures(texts, seed: int = 0):
    """[n, N_PERM] uint64 MinHash signatures over SHINGLE-word shingles (None
    for texts shorter than one shingle)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, N_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, N_PERM, dtype=np.uint64)
    mult = rng.integers(1, 2**63, SHINGLE, dtype=np.uint64) | np.uint64(1)
    cache: dict = {}
    sigs = []
    with np.errstate(over="ignore"):
        for text in texts:
            w = _word_ids(text, cache)
            if len(w) < SHINGLE:
                sigs.append(None)
                continue
            n = len(w) - SHINGLE + 1
            h = np.zeros(n, dtype=np.uint64)
            for j in range(SHINGLE):
                h = h * np.uint64(1099511628211) + w[j:j + n] * mult[j]
            h = np.unique(h)
            sig = np.full(N_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
            for s in range(0, len(h), 8192):
                chunk = h[s:s + 8192]
                sig = np.minimum(sig, (a[:, None] * chunk[None, :] + b[:, None]).min(axis=1))
            sigs.append(sig)
    return sigs


def near_duplicate_groups(sigs, threshold: float = NEAR_DUP_JACCARD):
    """Union-find roots: index -> smallest index of its near-duplicate group
    (LSH banding for candidates, then the signatures' Jaccard estimate)."""
    parent = list(range(len(sigs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = N_PERM // N_BANDS
    for band in range(N_BANDS):
        buckets: dict = {}
        for i, sig in enumerate(sigs):
            if sig is not None:
                buckets.setdefault(sig[band * rows:(band + 1) * rows].tobytes(), []).append(i)
        for members in buckets.values():
            for j in members[1:]:
                i0 = members[0]
                ri, rj = find(i0), find(j)
                if ri != rj and (sigs[i0] == sigs[j]).mean() >= threshold:
                    parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(sigs))]


def deduplicate(train, held, dropped: dict):
    """Exact then near-duplicate removal; keeps the first file of each group
    in corpus order; a training file in a group with a held-out file is dropped."""
    seen, kept = set(), []
    for name, text in train:
        key = hashlib.sha256("\n".join(l.rstrip() for l in text.splitlines()).encode()).digest()
        if key in seen:
            dropped["exact_dup"] += 1
            continue
        seen.add(key)
        kept.append((name, text))
    docs = held + kept
    roots = near_duplicate_groups(minhash_signatures([t for _, t in docs]))
    held_roots = {roots[i] for i in range(len(held))}
    out = []
    for i in range(len(held), len(docs)):
        if roots[i] in held_roots:
            dropped["near_dup_of_heldout"] += 1
        elif roots[i] != i:
            dropped["near_dup"] += 1
        else:
            out.append(docs[i])
    return out


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(INDENT_RUN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode(tok, texts):
    """uint16 stream ([EOT] doc [EOT] doc ... [EOT]), the EOT position before
    each doc and each doc's token count."""
    import numpy as np

    eot = tok.token_to_id(EOT)
    lens, chunks = [], []
    for s in range(0, len(texts), 2000):  # bounded memory on big corpora
        for e in tok.encode_batch(texts[s:s + 2000], add_special_tokens=False):
            lens.append(len(e.ids))
            chunks.append(np.array(e.ids, dtype=np.uint16))
    lens = np.array(lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]).astype(np.int64)
    stream = np.full(int(lens.sum() + len(texts) + 1), eot, dtype=np.uint16)
    for s, ids in zip(starts, chunks):
        stream[s + 1 : s + 1 + len(ids)] = ids
    return stream, starts, lens


def pack(out: Path, dest: Path) -> int:
    """One xz tar of the prepared folder (what travels to the GPU machine)."""
    import lzma

    dest.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(dest, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for name in ("tokenizer.json", "meta.json", "train_tokens.npy", "train_docs.npy",
                     "heldout_tokens.npy", "heldout_docs.npy"):
            tar.add(out / name, arcname=f"data/{name}")
    return dest.stat().st_size


def prepare(root: Path, out: Path, vocab_size: int, quiet: bool = False, dists=None,
            missing=(), manifest_path: Path | None = None) -> dict:
    import numpy as np

    if vocab_size > 65536:
        raise SystemExit("vocab must fit uint16")
    t0 = time.time()
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    files, dropped = collect_files(root)
    if not files:
        raise SystemExit(f"{root}: no usable .py files")
    train = [("stdlib/" + n, t) for n, t in files if not is_heldout(Path(n))]
    held = [("stdlib/" + n, t) for n, t in files if is_heldout(Path(n))]
    log(f"stdlib: {len(train)} train / {len(held)} held-out files ({time.time() - t0:.0f}s)")
    manifest = []
    if dists is not None:
        pkg_files, manifest = collect_packages(dists, dropped)
        train += pkg_files
        log(f"packages: {sum(r['used'] for r in manifest)} of {len(manifest)} used, "
            f"{len(pkg_files)} files ({time.time() - t0:.0f}s)")
    if not held or not train:
        raise SystemExit(f"{root}: empty split (train {len(train)}, held-out {len(held)})")
    train = deduplicate(train, held, dropped)
    log(f"after dedup: {len(train)} train files; dropped {dropped} ({time.time() - t0:.0f}s)")
    tok = train_tokenizer([t for _, t in train], vocab_size)
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(MASK) == 1
    log(f"tokenizer trained ({time.time() - t0:.0f}s)")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"root": str(root), "heldout_modules": HELDOUT_MODULES, "dropped": dropped,
            "vocab_size": tok.get_vocab_size(), "eot_id": 0, "mask_id": 1,
            "near_dup_jaccard": NEAR_DUP_JACCARD, "missing_packages": list(missing)}
    per_pkg: dict = {}
    for split, docs in (("train", train), ("heldout", held)):
        stream, starts, lens = encode(tok, [t for _, t in docs])
        np.save(out / f"{split}_tokens.npy", stream)
        np.save(out / f"{split}_docs.npy", starts)
        nbytes = sum(len(t.encode()) for _, t in docs)
        meta[split] = {"files": [n for n, _ in docs], "n_files": len(docs), "bytes": nbytes,
                       "tokens": int(stream.size), "bytes_per_token": nbytes / stream.size,
                       "sha256": hashlib.sha256(stream.tobytes()).hexdigest()}
        if split == "train":
            for (name, text), n in zip(docs, lens):
                row = per_pkg.setdefault(name.split("/", 1)[0], [0, 0, 0])
                row[0] += 1
                row[1] += len(text.encode())
                row[2] += int(n) + 1
    meta["train"]["by_source"] = {k: {"files": v[0], "bytes": v[1], "tokens": v[2]}
                                  for k, v in sorted(per_pkg.items())}
    tok.save(str(out / "tokenizer.json"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if manifest_path is not None:
        for row in manifest:
            got = per_pkg.get(_norm(row["name"]), [0, 0, 0])
            row["files"], row["bytes"], row["tokens"] = got
        doc = {"note": "scripts/prepare_code_data.py --packages: the installed distributions of the "
                       "project's dependency closure (dependencies + extras " + ", ".join(EXTRAS) +
                       "); 'used' = permissive license read from the dist-info metadata; files/bytes/"
                       "tokens = training files kept after the filters and deduplication",
               "stdlib": {"root": str(root), "license": "PSF-2.0",
                          "train": per_pkg.get("stdlib", [0, 0, 0])},
               "packages": manifest, "not_installed": list(missing),
               "totals": {s: {k: meta[s][k] for k in ("n_files", "bytes", "tokens")}
                          for s in ("train", "heldout")},
               "dropped": dropped}
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(doc, indent=1) + "\n")
    for split in ("train", "heldout"):
        m = meta[split]
        log(f"{split}: {m['n_files']} files, {m['bytes'] / 1e6:.1f} MB, {m['tokens']} tokens "
            f"({m['bytes_per_token']:.2f} bytes/token)")
    log(f"dropped {dropped}; vocab {meta['vocab_size']}; {time.time() - t0:.0f}s -> {out}")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=STDLIB, help="the standard library folder")
    p.add_argument("--out", type=Path, default=Path("build-train/data"))
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--packages", action="store_true",
                   help="add the permissively licensed installed packages of the project's closure")
    p.add_argument("--manifest", type=Path, default=None, help="write the package manifest (JSON) here")
    p.add_argument("--pack", type=Path, default=None, help="also write the folder as one .tar.xz here")
    args = p.parse_args(argv)
    dists, missing = project_closure() if args.packages else (None, ())
    prepare(args.root, args.out, args.vocab, dists=dists, missing=missing, manifest_path=args.manifest)
    if args.pack:
        print(f"packed {pack(args.out, args.pack) / 2**20:.1f} MiB -> {args.pack}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

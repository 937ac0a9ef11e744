"""The training pipeline of the default model on a toy corpus, on the CPU:
scripts/prepare_code_data.py (split, filters, licenses, deduplication,
tokenizer, token files), the block-diffusion masks / objective of
scripts/train_tiny_dlm.py, a 3-step run of the real training code path whose
checkpoint `bitdlm convert` accepts, and the GPU trainer
(scripts/train_dlm_gpu.py + fast_bitnet.py): same function as transformers'
BitNet, same loss as the reference objective, exact resume."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


prep = _load("prepare_code_data")
train = _load("train_tiny_dlm")
fast = _load("fast_bitnet")
gpu = _load("train_dlm_gpu")

FUNC = '''def f{i}(x, y={i}):
    """Return x plus {i}."""
    if x > y:
        for k in range(x):
            y += k * {i}
    return x + y


class C{i}:
    def method(self):
        return self.value_{i}
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(30):
        (root / f"mod{i}.py").write_text(FUNC.format(i=i) * 3)
    (root / "pkg").mkdir()
    (root / "pkg" / "core.py").write_text(FUNC.format(i=99))
    (root / "textwrap.py").write_text(FUNC.format(i=101) * 4)            # held out
    (root / "test").mkdir()
    (root / "test" / "test_textwrap.py").write_text(FUNC.format(i=102) * 4)  # held out
    (root / "test" / "test_mod1.py").write_text(FUNC.format(i=103))
    (root / "statistics").mkdir()                                         # held out (package form)
    (root / "statistics" / "__init__.py").write_text(FUNC.format(i=104) * 4)
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8: dropped
    (root / "broken.py").write_text("def f(:\n    pass\n")                 # no parse: dropped
    (root / "site-packages").mkdir()
    (root / "site-packages" / "foreign.py").write_text("x = 1\n")          # never read
    out = tmp_path_factory.mktemp("data")
    meta = prep.prepare(root, out, vocab_size=400, quiet=True)
    return root, out, meta


def test_prepare_split_filters_and_files(corpus):
    root, out, meta = corpus
    held = set(meta["heldout"]["files"])
    assert held == {"stdlib/textwrap.py", "stdlib/test/test_textwrap.py", "stdlib/statistics/__init__.py"}
    trained = set(meta["train"]["files"])
    assert "stdlib/test/test_mod1.py" in trained and "stdlib/pkg/core.py" in trained
    assert not held & trained
    assert not any("site-packages" in f for f in trained | held)
    assert {k: v for k, v in meta["dropped"].items() if v} == {"not_utf8": 1, "no_parse": 1}
    assert json.loads((out / "meta.json").read_text())["heldout_modules"] == prep.HELDOUT_MODULES


def test_prepare_streams_round_trip(corpus):
    from tokenizers import Tokenizer

    root, out, meta = corpus
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|mask|>") == 1
    for split in ("train", "heldout"):
        stream = np.load(out / f"{split}_tokens.npy")
        starts = np.load(out / f"{split}_docs.npy")
        assert stream.dtype == np.uint16 and starts.dtype == np.int64
        assert (stream[starts] == 0).all() and stream[-1] == 0
        ends = list(starts[1:]) + [len(stream) - 1]
        for name, s, e in zip(meta[split]["files"], starts, ends):
            text = (root / name.removeprefix("stdlib/")).read_text()
            assert tok.decode(stream[s + 1 : e].tolist(), skip_special_tokens=False) == text
            assert 0 not in stream[s + 1 : e]


def test_tokenizer_keeps_indentation_runs_whole(corpus):
    from tokenizers import Tokenizer

    _, out, _ = corpus
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("if x:\n        return y\n    z = 1")]
    space = "\u0120"  # ByteLevel's visible space; newline is \u010a
    assert "\u010a" + space * 8 in pieces and "\u010a" + space * 4 in pieces
    # frequent indentation runs became single tokens
    assert len(tok.encode("\n        ").ids) == 1 and len(tok.encode("\n    ").ids) == 1


def test_masks_shift_and_complementary():
    gen = torch.Generator().manual_seed(0)
    m = train.make_masks(3, 64, 16, True, True, gen)
    assert m.shape == (2, 3, 64)
    starts = torch.zeros(64, dtype=torch.bool)
    starts[::16] = True
    assert not m[:, :, starts].any()                       # block starts are never masked
    assert not (m[0] & m[1]).any()                         # complementary: disjoint
    assert ((m[0] | m[1]) == ~starts).all()                # ... and together cover every maskable token
    nm = train.make_masks(2, 64, 16, False, False, gen)
    assert nm.shape == (1, 2, 64)


def test_block_diffusion_attention_mask():
    L, blk = 8, 4
    a = train.block_diffusion_mask(L, blk, 2, None)[0, 0]
    assert a.dtype == torch.bool and a.shape == (3 * L, 3 * L)
    b = torch.arange(L) // blk
    for c in range(2):
        noisy = a[c * L:(c + 1) * L]
        assert torch.equal(noisy[:, c * L:(c + 1) * L], b[:, None] == b[None])   # own block, both ways
        assert torch.equal(noisy[:, 2 * L:], b[None] < b[:, None])                # clean blocks before
        other = 1 - c
        assert not noisy[:, other * L:(other + 1) * L].any()                      # never the other copy
    assert torch.equal(a[2 * L:, 2 * L:], b[None] <= b[:, None])                  # clean: block-causal
    assert not a[2 * L:, :2 * L].any()


def _tiny_args(**kw):
    args = train.parse_args(["--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
                             "--ffn", "64", "--seq-len", "32", "--block-size", "8", "--small-block-size", "4"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_objective_no_leak_of_masked_tokens():
    """A masked token of block b must not influence the noisy stream's hidden
    states of blocks <= b (it is only visible in clean block b, which noisy
    block b cannot see) -- the loss cannot cheat."""
    torch.manual_seed(0)
    args = _tiny_args()
    model = train.build_model(args, 50, 0).eval()
    L, blk = 32, 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(2, 50, (1, L), generator=gen)
    masks = train.make_masks(1, L, blk, True, False, gen)
    j = 2 * blk + 3                                                  # a masked token of block 2
    masks[0, 0, j] = True
    attn = train.block_diffusion_mask(L, blk, 1, None)

    def noisy_hidden(x):
        inp = torch.cat([torch.where(masks[0], torch.ones_like(x), x), x], dim=1)
        pos = torch.arange(L).repeat(2)[None]
        with torch.no_grad():
            return model.model(input_ids=inp, attention_mask=attn, position_ids=pos).last_hidden_state[0, :L]

    y = x.clone()
    y[0, j] = 2 + (x[0, j] - 2 + 1) % 48
    h1, h2 = noisy_hidden(x), noisy_hidden(y)
    assert torch.equal(h1[:3 * blk], h2[:3 * blk])
    assert not torch.equal(h1[3 * blk:], h2[3 * blk:])   # later blocks do see it (clean block 2)
    loss, correct, n = train.diffusion_loss(model, x, masks, blk, True, 1, attn)
    assert torch.isfinite(loss) and n == int(masks[0, 0, 1:].sum()) and 0 <= correct <= n


def test_three_step_cpu_run_converts(corpus, tmp_path):
    _, data, meta = corpus
    ckpt = tmp_path / "ckpt"
    rc = train.main(["--data", str(data), "--device", "cpu", "--amp", "bf16", "--steps", "3",
                     "--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--ffn", "128",
                     "--seq-len", "64", "--block-size", "16", "--small-block-size", "8", "--complementary",
                     "--batch", "4", "--micro-batch", "2", "--warmup", "1", "--eval-batches", "2",
                     "--out", str(ckpt), "--log-json", str(tmp_path / "log.json")])
    assert rc == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["trained_steps"] == 3 and all(np.isfinite(log["loss"]))
    assert log["final_eval"]["step"] == 3 and 0 <= log["final_eval"]["masked_acc"] <= 1
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["mask_token_id"] == 1 and cfg["vocab_size"] == meta["vocab_size"] and cfg["shift_logits"] is True

    from bitdlm.convert import convert
    from bitdlm.format import ModelFile

    out = tmp_path / "m.bin"
    convert(ckpt, out, progress=False)
    mf = ModelFile.open(out, verify=True)
    assert mf.meta["mask_token_id"] == 1 and mf.meta["vocab_size"] == meta["vocab_size"]
    assert mf.meta["diffusion"]["block_size"] == 16 and mf.meta["diffusion"]["small_block_size"] == 8


# ----------------------------------------------------------------------------- licenses, packages, dedup

def _meta(**fields):
    from email.message import Message

    m = Message()
    for k, v in fields.items():
        for item in (v if isinstance(v, list) else [v]):
            m[k.replace("_", "-")] = item
    return m


@pytest.mark.parametrize("fields, ok", [
    ({"License_Expression": "MIT"}, True),
    ({"License_Expression": "Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND BSD-3-Clause"}, True),
    ({"License_Expression": "Apache-2.0 OR GPL-2.0-only"}, True),        # one permissive alternative
    ({"License_Expression": "MPL-2.0 AND MIT"}, False),                  # every AND term must be
    ({"License_Expression": "GPL-3.0-or-later"}, False),
    ({"Classifier": ["License :: OSI Approved :: BSD License"]}, True),
    ({"Classifier": ["License :: OSI Approved :: MIT License",
                     "License :: OSI Approved :: GNU General Public License v2 (GPLv2)"]}, False),
    ({"License": "3-Clause BSD License"}, True),
    ({"License": "GPLv2"}, False),
    ({"License": "Copyright (c) somebody, all rights reserved"}, False),  # unknown
    ({}, False),
])
def test_classify_license(fields, ok):
    assert prep.classify_license(_meta(**fields))[0] is ok


MODULE = '''def helper_{i}(values, scale={i}):
    """Scale every value and keep the positive ones ({i})."""
    result = []
    for value in values:
        scaled = value * scale + {i}
        if scaled > 0:
            result.append(scaled)
    return result
'''


def _fake_dist(site: Path, name: str, license_expr: str, files: dict):
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n"
                                   f"License-Expression: {license_expr}\n")
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in files) + f"{info.name}/METADATA,,\n")


@pytest.fixture(scope="module")
def package_corpus(corpus, tmp_path_factory):
    import importlib.metadata as md

    root, _, _ = corpus
    site = tmp_path_factory.mktemp("site")
    body = "".join(MODULE.format(i=i) for i in range(12))
    near = body.replace("keep the positive ones (3)", "keep positive ones (3)")
    _fake_dist(site, "goodpkg", "MIT", {
        "goodpkg/__init__.py": "from .core import helper_0\n",
        "goodpkg/core.py": body,
        "goodpkg/x_copy_exact.py": body.replace("\n", "   \n"),               # exact duplicate (whitespace)
        "goodpkg/x_copy_near.py": near,                                     # near-duplicate
        "goodpkg/_vendor/six.py": MODULE.format(i=500),                   # vendored
        "goodpkg/api_pb2.py": MODULE.format(i=501),                       # generated (name)
        "goodpkg/gen.py": "# Code generated by a tool. DO NOT EDIT.\n" + MODULE.format(i=502),
        "goodpkg/table.py": "DATA = [" + ", ".join(str(i) for i in range(600)) + "]\n",   # data-like
        "goodpkg/tw.py": (root / "textwrap.py").read_text(),              # copy of a held-out module
    })
    _fake_dist(site, "gplpkg", "GPL-3.0-only", {"gplpkg/__init__.py": MODULE.format(i=900)})
    dists = sorted(md.distributions(path=[str(site)]), key=lambda d: d.metadata["Name"])
    out = tmp_path_factory.mktemp("pkgdata")
    manifest = out / "manifest.json"
    meta = prep.prepare(root, out, vocab_size=400, quiet=True, dists=dists, missing=["absentpkg"],
                        manifest_path=manifest)
    return out, meta, json.loads(manifest.read_text())


def test_packages_licenses_filters_and_dedup(package_corpus):
    out, meta, manifest = package_corpus
    trained = set(meta["train"]["files"])
    good = {f for f in trained if f.startswith("goodpkg/")}
    assert good == {"goodpkg/goodpkg/__init__.py", "goodpkg/goodpkg/core.py"}
    assert not any(f.startswith("gplpkg/") for f in trained)
    d = meta["dropped"]
    assert d["vendored"] == 1 and d["generated"] == 2 and d["data_like"] == 1
    assert d["exact_dup"] == 1 and d["near_dup"] == 1 and d["near_dup_of_heldout"] == 1
    rows = {r["name"]: r for r in manifest["packages"]}
    assert rows["goodpkg"]["used"] and rows["goodpkg"]["license"] == "MIT" and rows["goodpkg"]["files"] == 2
    assert rows["goodpkg"]["version"] == "1.0" and rows["goodpkg"]["tokens"] > 0
    assert not rows["gplpkg"]["used"] and rows["gplpkg"]["files"] == 0
    assert manifest["not_installed"] == ["absentpkg"]
    assert manifest["totals"]["train"]["tokens"] == meta["train"]["tokens"]
    # the held-out split is the stdlib one, untouched by the packages
    assert set(meta["heldout"]["files"]) == {"stdlib/textwrap.py", "stdlib/test/test_textwrap.py",
                                             "stdlib/statistics/__init__.py"}


def test_pack_round_trip(package_corpus, tmp_path):
    import tarfile

    out, meta, _ = package_corpus
    dest = tmp_path / "data.tar.xz"
    prep.pack(out, dest)
    with tarfile.open(dest) as tar:
        tar.extractall(tmp_path, filter="data")
    for name in ("train_tokens.npy", "heldout_docs.npy", "tokenizer.json"):
        assert (tmp_path / "data" / name).read_bytes() == (out / name).read_bytes()


# ----------------------------------------------------------------------------- the GPU trainer, on the CPU

def test_flex_mask_mod_matches_dense_mask():
    L, blk, copies = 16, 4, 2
    n = (copies + 1) * L
    q = torch.arange(n)[:, None].expand(n, n)
    kv = torch.arange(n)[None, :].expand(n, n)
    got = fast.block_diffusion_mask_mod(L, blk, copies)(0, 0, q, kv)
    assert torch.equal(got, train.block_diffusion_mask(L, blk, copies, None)[0, 0])


@pytest.mark.parametrize("complementary, shift", [(True, True), (False, True), (False, False)])
def test_fast_model_and_loss_match_transformers(complementary, shift):
    torch.manual_seed(0)
    args = _tiny_args()
    hf = train.build_model(args, 50, 0).eval()
    fm = fast.FastBitNet(hf.config).eval()
    fm.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, strict=True)
    L, blk = 32, 8
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(2, 50, (3, L), generator=gen)
    masks = train.make_masks(3, L, blk, shift, complementary, gen)
    attn = train.block_diffusion_mask(L, blk, masks.shape[0], None)
    pos = torch.arange(L).repeat(masks.shape[0] + 1)[None].expand(3, -1)
    inp = torch.cat([torch.where(m, torch.ones_like(x), x) for m in masks] + [x], dim=1)
    with torch.no_grad():
        h_ref = hf.model(input_ids=inp, attention_mask=attn.expand(3, -1, -1, -1),
                         position_ids=pos).last_hidden_state
        h_fast = fm.model(input_ids=inp, attention_mask=attn, position_ids=pos).last_hidden_state
        ref = train.diffusion_loss(hf, x, masks, blk, shift, 1, attn)[0]
        got, n = fast.fixed_shape_loss(fm, x, masks, blk, shift, 1, attention_mask=attn)
    torch.testing.assert_close(h_fast, h_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    n_ref = int(sum(m[:, 1:].sum() if shift else m.sum() for m in masks))
    assert int(n) == n_ref + (3 * (L // blk - 1) if shift else 0)


def test_fast_quantizers_are_transformers_with_straight_through_gradients():
    from transformers.integrations.bitnet import ActQuant, WeightQuant

    w = torch.randn(8, 16, requires_grad=True)
    a = torch.randn(3, 16, requires_grad=True)
    assert torch.equal(fast.weight_quant(w), WeightQuant.apply(w))
    assert torch.equal(fast.act_quant(a), ActQuant.apply(a))
    (fast.weight_quant(w) * torch.arange(16.0)).sum().backward()
    (fast.act_quant(a) * torch.arange(16.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(16.0).expand(8, 16))
    assert torch.equal(a.grad, torch.arange(16.0).expand(3, 16))


def _gpu_args(data, out, *extra):
    return ["--data", str(data), "--device", "cpu", "--amp", "bf16", "--hidden", "64", "--layers", "2",
            "--heads", "2", "--kv-heads", "1", "--ffn", "128", "--seq-len", "64", "--block-size", "16",
            "--small-block-size", "8", "--complementary", "--batch", "4", "--micro-batch", "2",
            "--warmup", "1", "--eval-batches", "1", "--eval-every", "1000", "--log-every", "1",
            "--steps", "4", "--out", str(out), *extra]


def test_gpu_trainer_resume_is_exact_and_converts(corpus, tmp_path):
    _, data, meta = corpus
    assert gpu.main(_gpu_args(data, tmp_path / "one")) == 0
    assert gpu.main(_gpu_args(data, tmp_path / "two", "--leg-steps", "2")) == 0
    assert not (tmp_path / "two" / "DONE").exists()
    assert json.loads((tmp_path / "two" / "trainer_state.json").read_text())["step"] == 2
    assert gpu.main(_gpu_args(data, tmp_path / "two", "--resume", str(tmp_path / "two" / "state"))) == 0
    one = json.loads((tmp_path / "one" / "train_log.json").read_text())
    two = json.loads((tmp_path / "two" / "train_log.json").read_text())
    assert one["steps"] == two["steps"] == [0, 1, 2, 3]
    assert one["loss"] == two["loss"] and all(np.isfinite(one["loss"]))     # bit-exact continuation
    assert one["final_eval"]["loss"] == two["final_eval"]["loss"]
    assert [(g["start_step"], g["end_step"]) for g in two["legs"]] == [(0, 2), (2, 4)]
    # weights only (the portable checkpoint that comes back): continues with a fresh optimizer
    port = tmp_path / "port"
    assert gpu.main(_gpu_args(data, port, "--leg-steps", "2")) == 0
    (port / "state" / "state.pt").unlink()
    assert gpu.main(_gpu_args(data, tmp_path / "port2", "--resume", str(port))) == 0
    three = json.loads((tmp_path / "port2" / "train_log.json").read_text())
    assert three["weights_only_resumes"] == [2] and three["steps"] == [0, 1, 2, 3]
    assert three["loss"][:2] == one["loss"][:2]
    from bitdlm.convert import convert
    from bitdlm.format import ModelFile

    convert(tmp_path / "one", tmp_path / "m.bin", progress=False)
    mf = ModelFile.open(tmp_path / "m.bin", verify=True)
    assert mf.meta["vocab_size"] == meta["vocab_size"] and mf.meta["diffusion"]["block_size"] == 16


def test_init_bin_starts_from_the_function_of_a_converted_model(corpus, tmp_path):
    """--init-bin: the latent weights made from a .bin quantize back to the .bin's codes and scales
    (the first forward is the converted model's), a run from them trains, and a .bin of another
    tokenizer or shape is refused with a one-line reason."""
    _, data, _ = corpus
    assert gpu.main(_gpu_args(data, tmp_path / "one")) == 0
    from bitdlm.convert import convert
    from bitdlm.format import ModelFile
    from bitdlm.packing import unpack_i2

    binp = tmp_path / "m.bin"
    convert(tmp_path / "one", binp, progress=False)
    tok = json.loads((data / "tokenizer.json").read_text())["model"]["vocab"]
    arrays, meta = gpu.weights_from_bin(binp, tok)
    fb = _load("fast_bitnet")
    mf = ModelFile.open(binp)
    ternary = [n for n, t in mf.tensors.items() if t.dtype == "i2_b128"]
    assert ternary and set(arrays) == set(mf.tensors)
    for name in ternary:
        t = mf.tensors[name]
        codes = unpack_i2(mf.array(name), t.shape[1]).astype(np.float32)
        w = torch.from_numpy(arrays[name])
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        assert torch.equal((w * scale).round().clamp(-1, 1), torch.from_numpy(codes)), name
        assert float(scale) == pytest.approx(t.scale, rel=1e-5)
        eff = fb.weight_quant(w).numpy()
        assert np.allclose(eff, codes / np.float32(t.scale), rtol=1e-5, atol=0)
    assert gpu.main(_gpu_args(data, tmp_path / "init", "--init-bin", str(binp))) == 0
    log = json.loads((tmp_path / "init" / "train_log.json").read_text())
    assert log["init_bin"]["path"] == str(binp) and log["steps"] == [0, 1, 2, 3] and all(np.isfinite(log["loss"]))
    # the first step's loss is the converted model's loss, not a fresh model's
    fresh = json.loads((tmp_path / "one" / "train_log.json").read_text())
    assert log["loss"][0] < fresh["loss"][0]
    other = dict(tok)
    other["zzz-not-a-token"] = len(other)
    with pytest.raises(SystemExit, match="tokenizer"):
        gpu.weights_from_bin(binp, other)
    with pytest.raises(SystemExit, match="not this shape|is \\("):
        gpu.main(_gpu_args(data, tmp_path / "wide", "--init-bin", str(binp), "--hidden", "128"))
    # a .bin with the int8 table (--lm-head i8 --embedding i8, a larger shape's package form):
    # the same ternary latents, and the embedding rows the forward reads (int8 x row scale)
    b8 = tmp_path / "m8.bin"
    convert(tmp_path / "one", b8, progress=False, lm_head="i8", embedding="i8")
    a8, _ = gpu.weights_from_bin(b8, tok)
    assert set(a8) == set(arrays)
    assert all(np.array_equal(a8[n], arrays[n]) for n in arrays if n != "model.embed_tokens.weight")
    m8 = ModelFile.open(b8)
    want = m8.array("lm_head.weight").astype(np.float32) * m8.array("lm_head.scale")[:, None]
    assert np.array_equal(a8["model.embed_tokens.weight"], want)
    emb = arrays["model.embed_tokens.weight"]
    err = np.abs(a8["model.embed_tokens.weight"] - emb).max(axis=1)
    assert np.all(err <= np.abs(emb).max(axis=1) / 127 * 0.51 + 1e-6) and err.max() > 0
    assert gpu.main(_gpu_args(data, tmp_path / "init8", "--init-bin", str(b8))) == 0


def test_final_leg_ends_the_schedule_where_the_time_is_up(corpus, tmp_path):
    _, data, _ = corpus
    assert gpu.main(_gpu_args(data, tmp_path / "f", "--leg-steps", "2", "--final-leg")) == 0
    log = json.loads((tmp_path / "f" / "train_log.json").read_text())
    assert (tmp_path / "f" / "DONE").exists() and log["ended_early"] == {"step": 2, "planned_steps": 4}
    assert log["steps"] == [0, 1] and log["final_eval"]["step"] == 2

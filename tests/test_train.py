"""The training pipeline of the default model on a toy corpus, on the CPU:
scripts/prepare_code_data.py (split, filters, tokenizer, token files),
the block-diffusion masks / objective of scripts/train_tiny_dlm.py, and a
3-step run of the real training code path whose checkpoint `bitdlm convert`
accepts."""
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
    assert held == {"textwrap.py", "test/test_textwrap.py", "statistics/__init__.py"}
    trained = set(meta["train"]["files"])
    assert "test/test_mod1.py" in trained and "pkg/core.py" in trained
    assert not held & trained
    assert not any("site-packages" in f for f in trained | held)
    assert meta["dropped"] == {"not_utf8": 1, "no_parse": 1, "codec_table": 0}
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
            text = (root / name).read_text()
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

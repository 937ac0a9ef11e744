"""Small `.bin` files for the format tests (shared by test_format.py and
test_fuzz.py; no torch): metadata, random tensors of every stored dtype, and
`write_model`."""
import numpy as np

from bitdlm import packing
from bitdlm.format import ModelWriter, expected_tensors


def word_tokenizer(n: int) -> str:
    """A real (WordLevel) tokenizer.json with n tokens, one of them non-ASCII."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"a\u00e9": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


_TOKENIZER_JSON = word_tokenizer(100)


def small_meta(**over):
    meta = {
        "architecture": "bitnet", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 128,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "hidden_act": "relu2", "quant": {"weights": "i2_b128", "lm_head": "f16"},
        "bos_token_id": None, "eos_token_ids": [0, 3], "mask_token_id": 1, "pad_token_id": 0,
        "diffusion": {"block_size": 32, "small_block_size": 8, "threshold": 0.9, "shift_logits": True},
        "chat_template": "{{ messages }} \u00e9\u4e2d",  # non-ASCII survives
        "tokenizer_json": _TOKENIZER_JSON,
        "source": {"test": True},
    }
    meta.update(over)
    return meta


def random_tensors(meta, seed=0):
    """name -> (stored array, scale) for every tensor the metadata calls for."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in expected_tensors(meta).items():
        if dtype == "i2_b128":
            codes = rng.integers(-1, 2, size=shape).astype(np.int8)
            out[name] = (packing.pack_i2(codes), float(rng.uniform(10, 100)), codes)
        elif dtype == "f16":
            out[name] = (rng.standard_normal(shape).astype(np.float16), None, None)
        elif dtype == "i8":
            out[name] = (rng.integers(-127, 128, size=shape).astype(np.int8), None, None)
        else:
            out[name] = (rng.standard_normal(shape).astype(np.float32), None, None)
    return out


def write_model(path, meta=None, tensors=None, chunked=False):
    meta = meta or small_meta()
    tensors = tensors or random_tensors(meta)
    with ModelWriter(path, meta, expected_tensors(meta)) as w:
        for name, (arr, scale, _) in reversed(list(tensors.items())):  # any order works
            data = np.array_split(arr, 3) if chunked and arr.ndim == 2 else arr
            w.write(name, data, scale=scale)
        w.commit()
    return tensors

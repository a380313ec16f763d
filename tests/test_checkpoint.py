"""Checkpoint I/O: save -> load bit-exact (single file and sharded), the meta-device load path, and every refusal
(corrupt, truncated, mismatched, pickled, missing, hub id offline or without huggingface_hub)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import longcpm.models.checkpoint as ckpt
from longcpm.errors import CheckpointError, ConfigError, LongcpmError
from longcpm.models.checkpoint import INDEX_NAME, load_model, save_model

SRC = Path(__file__).resolve().parents[1] / "src"


def assert_same_weights(a, b, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k] if dtype is None else sa[k].to(dtype)
        assert sb[k].dtype == want.dtype, k
        assert torch.equal(sb[k], want), k


# ---- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_single_file_round_trip_bit_exact(tmp_path, tiny_model, tie):
    model = tiny_model(seed=1, tie_word_embeddings=tie)
    path = save_model(model, tmp_path / "m")
    assert (path / "model.safetensors").is_file() and not (path / INDEX_NAME).exists()
    names = set(load_file(str(path / "model.safetensors")))
    assert ("lm_head.weight" in names) == (not tie)  # a tied head is not written (spec §5)
    assert "model.embed_tokens.weight" in names
    assert not any("rotary" in n for n in names)
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_sharded_round_trip_bit_exact(tmp_path, tiny_model):
    model = tiny_model(seed=2, tie_word_embeddings=False, layers=3)
    path = save_model(model, tmp_path / "m", max_shard_bytes=64 * 1024)
    index = json.loads((path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert not (path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(dict(model.named_parameters()))
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in model.parameters())
    for s in shards:
        assert (path / s).is_file()
        with safe_open(str(path / s), framework="pt") as h:
            assert set(h.keys()) == {n for n, f in index["weight_map"].items() if f == s}
    loaded = load_model(path)
    assert_same_weights(model, loaded)
    # re-saving into the same folder as one file removes the old shards and index
    save_model(loaded, path)
    assert (path / "model.safetensors").is_file() and not (path / INDEX_NAME).exists()
    assert not list(path.glob("model-*.safetensors"))
    assert_same_weights(model, load_model(path))


def test_dtypes_round_trip(tmp_path, tiny_model):
    model = tiny_model(seed=3)
    p32 = save_model(model, tmp_path / "fp32")
    pbf = save_model(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((p32 / "config.json").read_text())["torch_dtype"] == model.config.torch_dtype
    assert json.loads((pbf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(pbf / "model.safetensors"), framework="pt") as h:
        assert all(h.get_tensor(k).dtype == torch.bfloat16 for k in h.keys())
    assert_same_weights(model, load_model(p32, dtype="float32"))
    assert_same_weights(model, load_model(p32, dtype="bfloat16"), dtype=torch.bfloat16)  # cast on load
    assert_same_weights(model, load_model(pbf, dtype="bfloat16"), dtype=torch.bfloat16)
    # a bf16 model saved as is comes back bit-exact in bf16
    mbf = load_model(pbf, dtype="bfloat16")
    assert_same_weights(mbf, load_model(save_model(mbf, tmp_path / "bf16b"), dtype=torch.bfloat16))
    # CPU default (dtype=None / "auto") is float32
    assert load_model(pbf).lm_head.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(p32, dtype="float8")


def test_loads_through_meta_then_assign(tiny_checkpoint, monkeypatch):
    built = []
    real_build = ckpt.build_model

    def spy(*args, **kwargs):
        m = real_build(*args, **kwargs)
        built.append({n: p.device.type for n, p in m.named_parameters()})
        return m

    monkeypatch.setattr(ckpt, "build_model", spy)
    model = load_model(tiny_checkpoint)
    assert len(built) == 1 and set(built[0].values()) == {"meta"}  # no random init on a real device
    for n, p in model.named_parameters():
        assert p.device.type == "cpu", n
    for n, b in model.named_buffers():
        assert b.device.type == "cpu", n
    rope = model.model.rotary_emb
    fresh = type(rope)(model.config)  # built on CPU: the reference tables
    for name, b in fresh.named_buffers():
        got = dict(rope.named_buffers())[name]
        assert got.dtype == torch.float32 and torch.equal(got, b), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_source_dir_and_folder_api(tiny_checkpoint):
    import longcpm

    model = longcpm.load_model(str(tiny_checkpoint))
    assert isinstance(model, torch.nn.Module)
    assert Path(model.source_dir) == tiny_checkpoint


# ---- refusals --------------------------------------------------------------------------------------------------


def _state(model):
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def test_corrupt_safetensors(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as ei:
        load_model(tiny_checkpoint)
    assert "model.safetensors" in str(ei.value)


def test_truncated_safetensors(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as ei:
        load_model(tiny_checkpoint)
    assert "model.safetensors" in str(ei.value)


def test_truncated_shard(tmp_path, tiny_model):
    path = save_model(tiny_model(seed=4), tmp_path / "m", max_shard_bytes=64 * 1024)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError) as ei:
        load_model(path)
    assert shard.name in str(ei.value)


def test_missing_unexpected_and_wrong_shape_listed_together(tiny_checkpoint, tiny_model):
    sd = _state(tiny_model(seed=5))
    del sd["model.norm.weight"]
    del sd["model.layers.1.self_attn.k_proj.weight"]
    sd["model.layers.0.self_attn.rotary.extra_weight"] = torch.zeros(3)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(sd, str(tiny_checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        load_model(tiny_checkpoint)
    msg = str(ei.value)
    for name in ("model.norm.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.rotary.extra_weight", "model.layers.0.mlp.up_proj.weight"):
        assert name in msg, name
    assert "missing" in msg and "unexpected" in msg and "shape" in msg
    assert "[64, 64]" in msg and "[128, 64]" in msg


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_each_mismatch_alone(tiny_checkpoint, tiny_model, case):
    sd = _state(tiny_model(seed=6))
    if case == "missing":
        del sd["model.layers.0.input_layernorm.weight"]
        name = "model.layers.0.input_layernorm.weight"
    elif case == "unexpected":
        name = "model.layers.7.mlp.up_proj.weight"
        sd[name] = torch.zeros(2, 2)
    else:
        name = "model.embed_tokens.weight"
        sd[name] = sd[name][:100].clone()
    save_file(sd, str(tiny_checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(tiny_checkpoint)


def test_untied_checkpoint_requires_lm_head(tmp_path, tiny_model):
    path = save_model(tiny_model(seed=7, tie_word_embeddings=False), tmp_path / "m")
    sd = load_file(str(path / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path, tiny_model):
    path = save_model(tiny_model(seed=8), tmp_path / "m", max_shard_bytes=64 * 1024)
    gone = sorted(path.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=gone.name):
        load_model(path)


class _Trap:
    """Unpickling this creates a file: proof that something ran code from the checkpoint."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _write_trap(path: Path, sentinel: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Trap(sentinel)}))


def test_trap_pickle_really_runs_code(tmp_path):
    sentinel = tmp_path / "control"
    _write_trap(tmp_path / "control.bin", sentinel)
    f = pickle.loads((tmp_path / "control.bin").read_bytes())["model.embed_tokens.weight"]
    f.close()
    assert sentinel.exists()  # so the refusal tests below are meaningful


@pytest.fixture
def no_unpickling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a checkpoint pickle was opened")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


def test_bin_only_folder_refused_never_unpickled(tmp_path, tiny_checkpoint, no_unpickling):
    folder = tmp_path / "binonly"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    sentinel = tmp_path / "PWNED"
    _write_trap(folder / "pytorch_model.bin", sentinel)
    with pytest.raises(CheckpointError) as ei:
        load_model(folder)
    msg = str(ei.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "pickle" in msg.lower()
    assert not sentinel.exists()


def test_bin_next_to_safetensors_is_ignored(tmp_path, tiny_checkpoint, no_unpickling):
    sentinel = tmp_path / "PWNED"
    _write_trap(tiny_checkpoint / "pytorch_model.bin", sentinel)
    load_model(tiny_checkpoint)
    assert not sentinel.exists()


def test_folder_without_weights(tmp_path, tiny_checkpoint):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(folder)


def test_folder_without_config(tmp_path, tiny_checkpoint):
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tiny_checkpoint)


@pytest.mark.parametrize("name", ["/nonexistent/model/dir", "./no-such-model", "no-such-model", "~/no/such/longcpm"])
def test_nonexistent_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # never reach the hub for these
    with pytest.raises(CheckpointError) as ei:
        load_model(name)
    assert name in str(ei.value)
    assert isinstance(ei.value, LongcpmError)


def test_file_instead_of_folder(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    with pytest.raises(CheckpointError) as ei:
        load_model(f)
    assert str(f) in str(ei.value) and "folder" in str(ei.value)


def test_hub_id_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(CheckpointError) as ei:
        load_model("openbmb/MiniCPM4.1-8B")
    msg = str(ei.value)
    assert "openbmb/MiniCPM4.1-8B" in msg and "huggingface_hub" in msg


def test_hub_id_offline_with_empty_cache(tmp_path):
    pytest.importorskip("huggingface_hub")
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HOME when it is imported: use a fresh interpreter
    code = (
        "from longcpm.models.checkpoint import load_model\n"
        "from longcpm.errors import CheckpointError\n"
        "try:\n"
        "    load_model('openbmb/MiniCPM4.1-8B')\n"
        "except CheckpointError as e:\n"
        "    print('CHECKPOINT_ERROR:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("CHECKPOINT_ERROR:"), (out, r.stderr)
    assert "openbmb/MiniCPM4.1-8B" in out and "HF_HUB_OFFLINE" in out
    assert "\n" not in out  # one line
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))

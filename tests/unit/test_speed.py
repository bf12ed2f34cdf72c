"""Speed options: attention backend, per-block checkpointing and compile, AdamW flavour, the sync-free
NaN guard, and the metrics the speed bench reads."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tristage.cli import main as cli_main
from tristage.demo.tiny_run import write_tiny_stage1
from tristage.train.config import ConfigError, ModelConfig, load_config
from tristage.train.families import family_of
from tristage.train.models.speed import compile_blocks, enable_checkpointing
from tristage.train.training import checkpoint_files as ckpt
from tristage.train.training.trainer import Trainer

from ..checkpoints import latest


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny stage-1 world with its cache and a config file (as in test_resume)."""
    return write_tiny_stage1(tmp_path_factory.mktemp("speed"))


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(config: Path, run_dir: Path, *overrides: str):
    return load_config(config, [f"run.dir={run_dir}", *overrides])


# -- attention backend ------------------------------------------------------------------------------


@pytest.fixture
def decoy_xformers(tmp_path, monkeypatch):
    """An importable `xformers` that fails loudly if anything imports it."""
    package = tmp_path / "decoy" / "xformers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the decoy xformers was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "decoy"))
    monkeypatch.delitem(sys.modules, "xformers", raising=False)
    importlib.invalidate_caches()
    assert importlib.util.find_spec("xformers") is not None


def test_sdpa_run_imports_nothing_from_xformers(setup, tmp_path, decoy_xformers):
    trainer = Trainer(cfg_for(setup, tmp_path / "run", "train.max_steps=1", "model.attention_backend=sdpa"))
    trainer.train()
    assert trainer.state.step == 1
    assert "xformers" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_missing_is_a_one_line_error_naming_the_key(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli_main(["train", str(setup), f"run.dir={run_dir}", "model.attention_backend=xformers"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{setup}: key 'model.attention_backend': xformers is not installed" in err
    assert not run_dir.exists()  # refused before any work


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.attention_backend=flash9", "key 'model.attention_backend': 'flash9' is not one of sdpa"),
        ("train.nonfinite_check=sometimes", "key 'train.nonfinite_check': 'sometimes' is not one of"),
        ("model.checkpoint_blocks=-2", "key 'model.checkpoint_blocks': must be >= -1"),
        ("train.grad_accum=0", "key 'train.grad_accum': must be >= 1"),
        ("optim.lr_schedule=linear", "key 'optim.lr_schedule': 'linear' is not one of constant, cosine"),
        ("train.mixed_precision=fp8", "key 'train.mixed_precision': 'fp8' is not one of no, fp16, bf16"),
    ],
)
def test_bad_speed_options_name_key_and_file(setup, tmp_path, override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"{setup} (command-line override): {message}")):
        cfg_for(setup, tmp_path / "run", override)


@pytest.mark.parametrize("spelling", ["no", "'no'", "false"])
def test_mixed_precision_no_unquoted_on_the_command_line_is_no(setup, tmp_path, spelling):
    """YAML reads an unquoted `no` as false; accelerate's word must still mean full precision."""
    cfg = cfg_for(setup, tmp_path / "run", f"train.mixed_precision={spelling}")
    assert cfg.train.mixed_precision == "no"


# -- activation checkpointing -------------------------------------------------------------------------


def tiny_model_and_inputs(family: str):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, size="tiny", sample_size=8, caption_channels=16, num_classes=10)
    model = family_of(family).build(cfg, 8)
    for p in model.parameters():  # zero-initialised outputs would make most gradients trivially 0
        torch.nn.init.normal_(p, std=0.1)
    cond = {
        "pixart": lambda: {
            "encoder_hidden_states": torch.randn(2, 5, 16),
            "encoder_attention_mask": torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]),
        },
        "dit": lambda: {"class_labels": torch.tensor([3, 10])},
    }[family]()
    return model, (torch.randn(2, 4, 8, 8), torch.tensor([7, 900])), cond


def forward_backward(model, inputs, cond) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    calls = [0] * len(model.transformer_blocks)
    hooks = [
        block.attn1.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(model.transformer_blocks)
    ]
    out = model(inputs[0], timestep=inputs[1], return_dict=False, **cond)[0]
    out.square().mean().backward()
    for hook in hooks:
        hook.remove()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("family", ["pixart", "dit"])
@pytest.mark.parametrize("blocks", [-1, 1])
def test_checkpointing_keeps_outputs_and_grads(family, blocks):
    model, inputs, cond = tiny_model_and_inputs(family)
    twin = copy.deepcopy(model)
    assert enable_checkpointing(twin, blocks) == (2 if blocks == -1 else 1)
    out, grads, calls = forward_backward(model, inputs, cond)
    out_ckpt, grads_ckpt, calls_ckpt = forward_backward(twin, inputs, cond)
    assert calls == [1, 1]
    assert calls_ckpt == ([2, 2] if blocks == -1 else [2, 1])  # checkpointed blocks run again in backward
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert twin.state_dict().keys() == model.state_dict().keys()


def test_checkpointed_blocks_run_plainly_without_grad():
    model, inputs, cond = tiny_model_and_inputs("pixart")
    twin = copy.deepcopy(model)
    enable_checkpointing(twin, -1)
    with torch.no_grad():
        out = model(inputs[0], timestep=inputs[1], return_dict=False, **cond)[0]
        out_ckpt = twin(inputs[0], timestep=inputs[1], return_dict=False, **cond)[0]
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)


# -- compile --------------------------------------------------------------------------------------------


def test_compile_option_compiles_each_block(setup, tmp_path):
    trainer = Trainer(cfg_for(setup, tmp_path / "run", "train.compile=true"))
    blocks = list(trainer.model.transformer_blocks)
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert trainer.model._compiled_call_impl is None  # per block, not the whole model
    plain = Trainer(cfg_for(setup, tmp_path / "plain"))
    assert all(b._compiled_call_impl is None for b in plain.model.transformer_blocks)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    model, inputs, cond = tiny_model_and_inputs("pixart")
    twin = copy.deepcopy(model)
    compile_blocks(twin)
    out, grads, _ = forward_backward(model, inputs, cond)
    out_c, grads_c, _ = forward_backward(twin, inputs, cond)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)


# -- AdamW flavour and the NaN guard --------------------------------------------------------------------


def _prepared_adamw(cfg) -> torch.optim.AdamW:
    trainer = Trainer(cfg)
    trainer._prepare()  # AdamW is built once, here, over the parameters that train
    return trainer.adamw


def test_adamw_is_foreach_on_cpu_and_fused_for_the_sync_free_guard(setup, tmp_path):
    step = _prepared_adamw(cfg_for(setup, tmp_path / "a")).defaults
    log = _prepared_adamw(cfg_for(setup, tmp_path / "b", "train.nonfinite_check=log")).defaults
    assert (step["foreach"], step["fused"]) == (True, False)
    assert (log["foreach"], log["fused"]) == (False, True)


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer._unwrapped().state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    for i, per_param in enumerate(trainer.adamw.state.values()):
        state.update({f"adam{i}.{k}": v.clone() for k, v in per_param.items()})
    return state


def test_sync_free_guard_skips_exactly_and_stops_at_the_next_log_step(setup, tmp_path):
    """log_every=4, max_nonfinite=3; steps 2.. are bad: nothing moves from the snapshot before step 2
    (weights, EMA, AdamW moments and step count), the stop comes at the log step 8, with 6 skips."""
    run_dir = tmp_path / "run"
    trainer = Trainer(
        cfg_for(setup, run_dir, "train.max_steps=20", "train.max_nonfinite=3", "train.nonfinite_check=log")
    )
    real_loss, before = trainer.objective.loss, {}

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        if trainer.state.step < 2:
            return loss, metrics
        if not before:
            before.update(snapshot(trainer))
        return loss * float("nan"), metrics

    trainer.objective.loss = poisoned
    with pytest.raises(FloatingPointError, match="6 consecutive non-finite steps"):
        trainer.train()
    assert trainer.state.step == 8 and trainer.state.nonfinite_skips == 6
    after = snapshot(trainer)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    saved = latest(run_dir / "checkpoints")
    assert ckpt.read_state(saved).nonfinite_skips == 6
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [4, 8]


def test_sync_free_guard_trains_like_the_per_step_guard(setup, tmp_path):
    """All-finite steps: fused AdamW + gated EMA land where foreach AdamW + lerp EMA do."""
    result = {}
    for mode in ("step", "log"):
        trainer = Trainer(
            cfg_for(setup, tmp_path / mode, "train.max_steps=4", f"train.nonfinite_check={mode}")
        )
        trainer.train()
        result[mode] = snapshot(trainer)
    assert result["step"].keys() == result["log"].keys()
    for k in result["step"]:
        torch.testing.assert_close(result["log"][k], result["step"][k], rtol=1e-5, atol=1e-6, msg=k)
    logged = json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= logged["data_wait_share"] <= 1.0 and logged["cpu_util"] > 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_fused_adamw_and_pinned_batches(setup, tmp_path):
    trainer = Trainer(cfg_for(setup, tmp_path / "run", "train.max_steps=1"))
    assert trainer.adamw.defaults["fused"] is True
    batch = next(iter(trainer.loader))
    assert batch["mean"].is_pinned() and batch["text" if "text" in batch else "labels"].is_pinned()
    trainer.train()
    assert torch.backends.cuda.matmul.allow_tf32

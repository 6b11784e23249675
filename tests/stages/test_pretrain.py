"""Pretraining end to end on the digits demo: outputs, learning, DDP, exact resume, accumulation, failures."""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crate_mae.config import ClassifierConfig, MAEConfig, OptimConfig, load_config
from crate_mae.data import Batch
from crate_mae.engine import checkpoint as ckpt
from crate_mae.engine.dist import Dist
from crate_mae.engine.trainer import NonFiniteLoss, Trainer
from crate_mae.engine.optim import build_optimizer, build_scheduler
from crate_mae.model import build_classifier, build_mae, hub, read_checkpoint, resolve_config
from crate_mae.model import files
from crate_mae.model.classifier import ClassifierObjective
from crate_mae.model.mae import CrateMAE, MaskedObjective
from crate_mae.stages.pretrain import run_pretrain
from tests.spawn import spawn

ROOT = Path(__file__).resolve().parents[2]
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def images(x: torch.Tensor, noise: torch.Tensor | None = None) -> Batch:
    """A micro-batch of images (no labels), or of images with their masking noise (FixedMasks reads it)."""
    return Batch(x, noise if noise is not None else torch.full((len(x),), -1), [])


class FixedMasks(MaskedObjective):
    """The masked objective under given noise (carried where the labels go): the same masks in every run."""

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.forward_masked(images, noise=noise).loss


class Scaled(MaskedObjective):
    """The masked objective times the next of `factors`: a loss made non-finite at a chosen step."""

    def __init__(self, mae: CrateMAE, factors) -> None:
        super().__init__(mae)
        self.factors = factors

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(images, labels) * next(self.factors)


def tiny(digits: tuple[str, str], out: Path, *extra: str):
    """The nano model on the digits demo: a CPU step in milliseconds."""
    return load_config(ROOT / "configs/pretrain/demo.yaml", [
        "model.variant=nano", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}", "data.batch_size=32",
        "data.num_workers=0", "data.shuffle_buffer=64", "optim.epochs=1", "optim.warmup_epochs=0.2",
        "optim.blr=2e-2", f"run.out_dir={out}", "run.name=t", "run.log_every=5", "run.ckpt_every=10", "monitor.every=0",
        *extra])


def test_default_command_writes_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python pretrain.py` with a shortened schedule, from an empty folder: the demo shards are written too."""
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(ROOT))
    import pretrain

    assert pretrain.main(["--set", "model.variant=nano", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.ckpt_every=20",
                          "run.keep_last=1"]) == 0
    run = tmp_path / "runs" / "demo"
    assert (tmp_path / "shards/digits/train.json").exists()
    for name in ("config.yaml", "final.pth", "encoder.pth", "reconstructions.png", "log.jsonl"):
        assert (run / name).stat().st_size > 0, name
    assert [p.name for p in ckpt.periodic(run)] == ["ckpt-00000040.pth"]  # keep_last=1 of 20, 40
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert load_config(run / "config.yaml").model.variant == "nano"
    assert pretrain.main(["--set", "model.variant=nano"]) == 1  # the run exists: resume or rename, said clearly


def test_loss_falls_on_the_demo_set(digits, tmp_path: Path) -> None:
    result = run_pretrain(tiny(digits, tmp_path, "optim.epochs=2", "run.log_every=10"))
    assert result.steps == 2 * (1497 // 32)
    assert result.last_loss < 0.8 * result.first_loss, (result.first_loss, result.last_loss)


def test_exported_encoder_loads_into_a_classifier(digits, tmp_path: Path) -> None:
    result = run_pretrain(tiny(digits, tmp_path, "optim.epochs=1"))
    exported = torch.load(result.run_dir / "encoder.pth", weights_only=True)
    clf = build_classifier(ClassifierConfig(variant="nano", num_classes=10))
    hub.load_weights(clf, exported)
    img = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clf.forward_features(img), result.model.eval().encode(img))


def test_mismatched_checkpoint_names_the_field(digits, tmp_path: Path) -> None:
    run_pretrain(tiny(digits, tmp_path, "optim.epochs=1"))
    with pytest.raises(ValueError, match=r"final\.pth: model\.encoder_depth is 3 in the checkpoint but 4 in the config"):
        run_pretrain(tiny(digits, tmp_path, "optim.epochs=1", "model.encoder_depth=4", "run.resume=auto"))
    with pytest.raises(FileExistsError, match="--resume auto"):
        run_pretrain(tiny(digits, tmp_path, "optim.epochs=1"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(digits, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss, calls = CrateMAE.loss, {"n": 0}

    def poisoned(self, img, pred, mask):  # fault injection: the 13th step's loss is NaN (checkpoint checks not counted)
        calls["n"] += torch.is_grad_enabled()
        return real_loss(self, img, pred, mask) * (float("nan") if calls["n"] == 13 and torch.is_grad_enabled() else 1.0)

    monkeypatch.setattr(CrateMAE, "loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="not finite at step 13"):
        run_pretrain(tiny(digits, tmp_path, "run.ckpt_every=10", "run.log_every=100"))
    run = tmp_path / "t"
    assert [p.name for p in ckpt.periodic(run)] == ["ckpt-00000010.pth"] and not (run / "final.pth").exists()
    good = read_checkpoint(run / "ckpt-00000010.pth")
    assert all(torch.isfinite(v).all() for v in good.state.values())


def test_no_checkpoint_holds_weights_whose_loss_is_not_finite(digits, tmp_path: Path) -> None:
    """A huge lr diverges in the first update: its own loss was finite, the next one is not. With a checkpoint
    every step, the guard must stop before writing ckpt-00000001.pth, not one step later."""
    with pytest.raises(NonFiniteLoss, match="weights after step 1 .* give a non-finite loss"):
        run_pretrain(tiny(digits, tmp_path, "optim.lr=1e12", "optim.warmup_epochs=0", "run.ckpt_every=1",
                          "run.log_every=100"))
    assert ckpt.periodic(tmp_path / "t") == [] and not (tmp_path / "t" / "final.pth").exists()


def test_the_checkpoint_check_leaves_the_random_stream_alone() -> None:
    model = build_mae(MAEConfig(variant="nano"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(MaskedObjective(model), optimizer=opt, dist=CPU,
                      scheduler=build_scheduler(OptimConfig(epochs=10, warmup_epochs=0), opt, 1))
    trainer.step([images(torch.randn(2, 3, 32, 32))])
    before = torch.get_rng_state()
    trainer.check_state_finite()  # draws a mask, then puts every generator back
    assert torch.equal(torch.get_rng_state(), before)


def test_trainer_names_the_first_non_finite_step() -> None:
    model = build_mae(MAEConfig(variant="nano"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    values = iter([1.0, 1.0, float("inf"), 1.0])
    trainer = Trainer(Scaled(model, values), optimizer=opt, dist=CPU,
                      scheduler=build_scheduler(OptimConfig(epochs=10, warmup_epochs=0), opt, 1))
    for _ in range(4):
        trainer.step([images(torch.randn(2, 3, 32, 32))])
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        trainer.check_finite()


class Loader:
    """Fixed micro-batches behind the training loader's epoch interface (`set_epoch` with a resume's replay)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.calls, self.replay = batches, [], 0

    def set_epoch(self, epoch: int, replay: int = 0) -> None:
        self.calls.append((epoch, replay))
        self.replay = replay

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.replay:])


class Work:
    """A stage's per-step work (an EMA, the online probe), kept in checkpoints as they are: a count of steps seen."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def test_fit_hands_each_step_to_the_stage_before_it_is_saved(tmp_path: Path) -> None:
    """Trainer.fit: each optimiser step (2 micro-batches) comes back to the stage as its last micro-batch, and the
    stage's work on it is in that step's checkpoint; each epoch ends in the stage, after its last step's save; an
    epoch the stage leaves before its end is an error, not a silent skip."""
    from crate_mae.engine.log import RunLogger

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = build_mae(MAEConfig(variant="nano"))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return Trainer(MaskedObjective(model), optimizer=opt, dist=CPU, epochs=2, accum_steps=2, updates_per_epoch=3,
                       scheduler=build_scheduler(OptimConfig(epochs=2, warmup_epochs=0), opt, 3))

    pixels = torch.randint(0, 256, (6, 2, 3, 32, 32), dtype=torch.uint8)
    loader = Loader([Batch(x, torch.full((2,), -1), [f"b{i}"]) for i, x in enumerate(pixels)])
    work, log = Work(), RunLogger(tmp_path, enabled=False, total_steps=6)
    checkpointer = ckpt.Checkpointer(tmp_path, every=2, keep_last=9, config={}, dist=CPU, extra={"work": work})
    seen: list = []
    training = trainer()
    for epoch in training.fit(loader, log=log, log_every=100, checkpointer=checkpointer):
        for batch in epoch:
            work.steps += 1
            seen.append(batch.keys[0])
        seen.append(training.state.epoch)
    assert seen == ["b1", "b3", "b5", 1, "b1", "b3", "b5", 2] and loader.calls == [(0, 0), (1, 0)]
    saved = {p.name: torch.load(p, weights_only=True)["work"] for p in ckpt.periodic(tmp_path)}
    assert saved == {"ckpt-00000002.pth": {"steps": 2}, "ckpt-00000004.pth": {"steps": 4}}
    epochs = trainer().fit(loader, log=log, log_every=100, checkpointer=checkpointer)
    next(epochs)  # the first epoch, left unread
    with pytest.raises(RuntimeError, match="left before its end"):
        next(epochs)


@pytest.mark.parametrize("stage", ["pretrain", "linprobe", "finetune"])
def test_every_stage_builds_its_trainer_from_the_config(stage: str) -> None:
    """One builder (Trainer.from_config): peak lr = blr × global batch / 256, steps per epoch over the
    accumulation, and the clipping / precision keys honoured in every stage (the probe once ignored them)."""
    cfg = load_config(ROOT / f"configs/{stage}/demo.yaml", [
        "model.variant=nano", "data.batch_size=8", "optim.accum_steps=2", "optim.lr=null", "optim.blr=0.064",
        "optim.clip_grad=0.5", "run.precision=bf16"], stage=stage)
    objective = ClassifierObjective(torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss())
    trainer = Trainer.from_config(cfg, objective, CPU, batches_per_epoch=11)
    assert (trainer.updates_per_epoch, trainer.global_batch, trainer.total_steps) == (5, 16, 5 * cfg.optim.epochs)
    assert max(g["initial_lr"] for g in trainer.optimizer.param_groups) == pytest.approx(0.064 * 16 / 256)
    assert (trainer.clip_grad, trainer.precision) == (0.5, "bf16")


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch() -> None:
    torch.manual_seed(0)
    base = build_mae(MAEConfig(variant="nano"))
    img, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)
    after = []
    for micro in ([(img, noise)], [(img[:4], noise[:4]), (img[4:], noise[4:])],
                  [(img[i:i + 2], noise[i:i + 2]) for i in range(0, 8, 2)]):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        trainer = Trainer(FixedMasks(model), optimizer=opt, dist=CPU,
                          scheduler=build_scheduler(OptimConfig(epochs=10_000, warmup_epochs=0), opt, 1))
        trainer.step([images(x, n) for x, n in micro])
        after.append(model.state_dict())
    for key in after[0]:
        torch.testing.assert_close(after[1][key], after[0][key], atol=1e-6, rtol=1e-5, msg=key)
        torch.testing.assert_close(after[2][key], after[0][key], atol=1e-6, rtol=1e-5, msg=key)
    assert not torch.equal(after[0]["decoder_pred.weight"], base.state_dict()["decoder_pred.weight"])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("device,mode", [("cpu", "default"),
                                         pytest.param("cuda", "reduce-overhead", marks=pytest.mark.gpu)])
def test_compiled_step_equals_the_eager_step(device: str, mode: str) -> None:
    """run.compile: torch.compile's fused kernels (and CUDA graphs) train the same model as eager.

    fp32 and SGD with momentum: an update linear in the gradient, so the comparison measures the model's maths
    (AdamW's first steps are sign-like and would magnify rounding in gradients near zero)."""
    torch.manual_seed(0)
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    base = build_mae(MAEConfig(variant="nano", encoder_depth=1, decoder_depth=1)).to(dist.device)
    batches = [(torch.randn(8, 3, 32, 32, device=dist.device), torch.rand(8, 64, device=dist.device)) for _ in range(3)]
    losses, weights = [], []
    for compile in (False, True):
        model = copy.deepcopy(base)
        cfg = OptimConfig(optimizer="sgd", epochs=1, warmup_epochs=0)
        opt = build_optimizer(cfg, model, 0.05, dist.device)
        trainer = Trainer(FixedMasks(model), optimizer=opt, dist=dist, scheduler=build_scheduler(cfg, opt, 100),
                          compile=compile, compile_mode=mode)
        assert hasattr(trainer.model, "_orig_mod") == compile  # torch.compile's wrapper
        losses.append(torch.stack([trainer.step([images(x[:4], n[:4]), images(x[4:], n[4:])])
                                   for x, n in batches]))  # accumulated
        weights.append(model.state_dict())
    tol = 1e-5 if device == "cpu" else 1e-4  # GPU kernels reduce in other orders
    torch.testing.assert_close(losses[1], losses[0], atol=tol, rtol=tol)
    assert not torch.equal(losses[0][0], losses[0][2])  # it trained
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=tol, rtol=10 * tol, msg=key)


def _ddp_rank(rank: int, world: int, port: int, digits: tuple[str, str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    result = run_pretrain(tiny(digits, Path(out), "data.batch_size=16", "run.ckpt_every=1000"))
    torch.save({"steps": result.steps, "model": result.model.state_dict()}, Path(out) / f"rank{rank}.pt")


def test_two_process_gloo_ddp_ranks_end_identical(digits, free_port: int, tmp_path: Path) -> None:
    spawn(_ddp_rank, args=(2, free_port, digits, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 1497 // (16 * 2)
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key
    assert (tmp_path / "t" / "final.pth").exists()


def _pretrain_cmd(digits: tuple[str, str], out: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain.py"), "--set", "model.variant=demo", f"data.train_shards={digits[0]}",
            f"data.val_shards={digits[1]}", "data.batch_size=32", "data.num_workers=2", "data.shuffle_buffer=64",
            "optim.epochs=1", "optim.warmup_epochs=0.3", f"run.out_dir={out}", f"run.name={name}",
            "run.ckpt_every=11", "run.log_every=10", "monitor.every=0"]


def test_resume_after_sigkill_ends_with_the_same_weights(digits, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_pretrain_cmd(digits, tmp_path, "whole"), check=True, env=env, capture_output=True, timeout=300)

    proc = subprocess.Popen(_pretrain_cmd(digits, tmp_path, "cut"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / "cut" / "ckpt-00000011.pth"  # mid-epoch, odd: the worker roles rotate
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert first.exists() and not (tmp_path / "cut" / "final.pth").exists(), "the run was not cut mid-way"

    subprocess.run([*_pretrain_cmd(digits, tmp_path, "cut"), "--resume", "auto"], check=True, env=env,
                   capture_output=True, timeout=300)
    whole, cut = (read_checkpoint(tmp_path / n / "final.pth") for n in ("whole", "cut"))
    assert whole.payload["state"] == cut.payload["state"]
    for key, value in whole.state.items():
        assert torch.equal(value, cut.state[key]), key


def test_export_command_and_lion(digits, tmp_path: Path) -> None:
    result = run_pretrain(tiny(digits, tmp_path, "optim.optimizer=lion", "optim.blr=1e-3", "run.ckpt_every=20"))
    assert result.last_loss < result.first_loss
    assert files.main(["export", str(tmp_path / "t" / "ckpt-00000020.pth"), str(tmp_path / "enc.pth")]) == 0
    exported = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert set(exported["model"]) == set(files.encoder_state(result.model.state_dict()))
    assert exported["config"]["optim"]["optimizer"] == "lion"


def test_param_groups_spare_norms_biases_and_tokens() -> None:
    from crate_mae.engine.optim import param_groups

    model = build_mae(MAEConfig(variant="nano"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.05)}
    assert {"cls_token", "mask_token", "encoder.norm.weight", "encoder.layers.0.attn.proj.bias"} <= groups[0.0]
    assert {"encoder.layers.0.ista.D", "decoder.layers.1.A", "encoder.layers.0.attn.U.weight"} <= groups[0.05]
    assert not groups[0.0] & groups[0.05]


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_training_on_cuda(digits, tmp_path: Path, compile: bool) -> None:
    result = run_pretrain(tiny(digits, tmp_path, "run.device=cuda", "run.precision=bf16", f"run.compile={compile}",
                               "optim.epochs=2", "run.log_every=10"))
    assert result.last_loss < 0.9 * result.first_loss


@pytest.mark.gpu
def test_mssa_fused_attention_matches_explicit_in_bf16() -> None:
    from crate_mae.model.crate import MSSA

    mssa = MSSA(dim=768, heads=12).cuda()
    z = torch.randn(8, 197, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast, slow = mssa(z), mssa.forward_reference(z)
    torch.testing.assert_close(fast.float(), slow.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_step_keeps_fp32_where_precision_needs_it(device: str) -> None:
    """Under bf16 autocast the matrix products run in bf16 while the loss, the weights and their gradients stay
    fp32, and the loss is within bf16 rounding of the fp32 one. (LayerNorm keeps its statistics in fp32 either
    way: autocast's policy on CUDA, the kernel's accumulation type on the CPU.)"""
    torch.manual_seed(0)
    model = build_mae(MAEConfig(variant="nano")).to(device)
    img, noise = torch.randn(8, 3, 32, 32, device=device), torch.rand(8, 64, device=device)
    dtypes: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            dtypes[name] = out.dtype
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if name in ("encoder.layers.0.attn.U", "encoder.layers.0.attn.proj")]
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model.forward_masked(img, noise=noise)
    for hook in hooks:
        hook.remove()
    assert dtypes == {"encoder.layers.0.attn.U": torch.bfloat16, "encoder.layers.0.attn.proj": torch.bfloat16}
    assert out.loss.dtype == torch.float32 and out.pred.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, model.forward_masked(img, noise=noise).loss, rtol=3e-2, atol=0)
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
def test_cuda_train_step_never_waits_on_the_host() -> None:
    """No host sync inside a bf16 step (fused AdamW, masking, loss, non-finite flag): CUDA's sync debug mode
    turns any synchronising call into an error."""
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    model = build_mae(MAEConfig(variant="nano")).to(dist.device)
    cfg = OptimConfig(epochs=1, warmup_epochs=0.5)
    opt = build_optimizer(cfg, model, 1e-3, dist.device)
    trainer = Trainer(MaskedObjective(model), optimizer=opt, dist=dist, precision="bf16",
                      scheduler=build_scheduler(cfg, opt, 10))
    img = images(torch.randn(8, 3, 32, 32, device=dist.device))
    img = img._replace(labels=img.labels.to(dist.device))
    trainer.step([img])  # the first step creates the optimiser state
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step([img, img])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.check_finite()


def test_a_resume_removes_stale_temp_files_and_is_marked_in_the_log(digits, tmp_path: Path) -> None:
    import json

    run_pretrain(tiny(digits, tmp_path, "run.ckpt_every=20"))
    run = tmp_path / "t"
    (run / "final.pth").unlink()  # as if killed after ckpt-00000040.pth, during a write of the next one
    stale = run / ".ckpt-00000060.pth.k2j3h4.tmp"
    stale.write_bytes(b"half a checkpoint")
    run_pretrain(tiny(digits, tmp_path, "run.ckpt_every=20", "run.resume=auto"))
    assert not stale.exists() and not list(run.glob(".*.tmp"))
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    marks = [e for e in events if e.get("event") == "resume"]
    assert len(marks) == 1 and marks[0]["step"] == 40 and marks[0]["checkpoint"].endswith("ckpt-00000040.pth")


def test_a_resume_trains_with_the_schedule_it_prints(digits, tmp_path: Path) -> None:
    """A changed lr / epochs / warm-up / weight decay applies from the resumed step, and the log says so."""
    import json

    def trainer_for(*overrides: str) -> Trainer:
        cfg = load_config(None, ["model.variant=nano", "data.batch_size=8", "optim.epochs=10", "optim.warmup_epochs=1",
                                 *overrides])
        torch.manual_seed(0)
        model = build_mae(resolve_config(cfg.model))
        return Trainer.from_config(cfg, MaskedObjective(model), CPU, batches_per_epoch=4)

    old = trainer_for("optim.lr=1e-3")
    for _ in range(6):
        old.step([images(torch.randn(2, 3, 32, 32))])
    saved = old.state_dict()
    same = trainer_for("optim.lr=1e-3")
    same.load_state_dict(saved)
    assert same.lr == old.lr and [g["weight_decay"] for g in same.optimizer.param_groups] == \
        [g["weight_decay"] for g in old.optimizer.param_groups]
    new = trainer_for("optim.lr=4e-3", "optim.epochs=20", "optim.weight_decay=0.2")
    new.load_state_dict(saved)
    reference = trainer_for("optim.lr=4e-3", "optim.epochs=20", "optim.weight_decay=0.2")
    reference.scheduler.step_update(num_updates=6)
    assert new.state.step == 6 and new.lr == pytest.approx(reference.lr) and new.lr != pytest.approx(old.lr)
    assert max(g["weight_decay"] for g in new.optimizer.param_groups) == 0.2
    assert torch.equal(next(iter(new.optimizer.state.values()))["exp_avg"],
                       next(iter(old.optimizer.state.values()))["exp_avg"])  # the moments continue

    run_pretrain(tiny(digits, tmp_path, "optim.epochs=2", "run.ckpt_every=20"))
    (tmp_path / "t" / "final.pth").unlink()
    run_pretrain(tiny(digits, tmp_path, "optim.epochs=2", "run.ckpt_every=20", "optim.blr=4e-2", "run.resume=auto"))
    events = [json.loads(line) for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    [mark] = [e for e in events if e.get("event") == "resume"]
    assert mark["changed"] == ["optim.blr 0.02 → 0.04"]
    with pytest.raises(ValueError, match=r"optim\.optimizer is 'adamw' in the checkpoint but 'lion'"):
        run_pretrain(tiny(digits, tmp_path, "optim.epochs=2", "optim.optimizer=lion", "run.resume=auto"))

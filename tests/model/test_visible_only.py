"""`model.visible_only`: MAE's encoder of the visible patches alone, around the CRATE-MAE's weights (CrateMAE's
docstring).

With nothing hidden it is the released model's function bit for bit; with patches hidden, neither their pixels nor the
mask token reach the encoder; the decoder gets the mask token plus each hidden place's position, in patch order; the
loss is the masked MSE; it compiles to one graph of static shapes, scripts and traces; and through the stages it
resumes bit-identical, trains identically on 2 gloo ranks, refuses a resume that flips it, and its files load for
init_from, a classifier and the viz commands as any CRATE-MAE's.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig, MAEConfig, load_config
from crate_mae.engine.dist import Dist
from crate_mae.errors import ConfigError
from crate_mae.model import build_mae, create_model, patchify, random_masking, read_checkpoint, unpatchify
from crate_mae.model.layers import sincos_pos_table
from crate_mae.model.mae import CrateMAE, MaskedObjective, masking
from crate_mae.stages.common import prepare
from crate_mae.stages.pretrain import build_training, run_pretrain
from tests.model.test_timm_contract import _fx, images, make
from tests.spawn import spawn

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
              pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode")]

ROOT = Path(__file__).resolve().parents[2]
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FAMILIES = ["mae", "alpha"]
N, GRID = 64, (8, 8)  # nano: 32 px, patch 4
NOTHING_HIDDEN = 1e-20  # a ratio in (0, 1) with int(N·(1 − r)) = N: 1 − 1e-20 rounds to 1.0


def pair(family: str, **overrides) -> tuple[CrateMAE, CrateMAE]:
    """The released model's way and the visible-only way, the same weights, in eval mode."""
    full = build_mae(MAEConfig(variant="nano", family=family, **overrides)).eval()
    visible = build_mae(MAEConfig(variant="nano", family=family, visible_only=True, **overrides)).eval()
    visible.load_state_dict(full.state_dict())
    return full, visible


def with_hidden_changed(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """img (B, 3, H, W) with every hidden patch's pixels (mask 1) shifted by 10."""
    patches = patchify(img, 4)
    return unpatchify(patches + 10.0 * mask[..., None], 4, GRID)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_hidden_is_the_released_function_bit_for_bit(family: str) -> None:
    full, visible = pair(family)
    img, noise = torch.randn(3, 3, 32, 32), torch.rand(3, N)
    a = full.forward_masked(img, mask_ratio=NOTHING_HIDDEN, noise=noise)
    b = visible.forward_masked(img, mask_ratio=NOTHING_HIDDEN, noise=noise)
    assert not b.mask.any() and torch.equal(a.mask, b.mask)
    assert torch.equal(a.pred, b.pred)
    every = torch.arange(N).expand(3, N)  # the helpers with every patch kept
    assert torch.equal(visible.encode_visible(img, every), full.encode(img))
    latent = visible.encode_visible(img, every)
    assert torch.equal(visible.decode(visible.decoder_input(latent, every, GRID)), full.decode(full.encode(img)))
    # with patches hidden the two ways are two functions of the same weights
    assert not torch.allclose(full.forward_masked(img, noise=noise).pred, visible.forward_masked(img, noise=noise).pred)


def test_masking_keeps_the_patches_random_masking_keeps() -> None:
    noise = torch.rand(5, N)
    mask, keep = masking(noise, 0.75)
    assert torch.equal(mask, random_masking(noise, 0.75)) and keep.shape == (5, 16)
    for b in range(5):
        assert keep[b].tolist() == sorted((mask[b] == 0).nonzero().flatten().tolist())  # ascending patch order


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_places_reach_no_visible_token(family: str) -> None:
    """Neither a hidden patch's pixels nor the mask token reach the visible tokens' encoder output (nor the
    prediction). The mask token does reach them in the released model, whose encoder attends over it, and pixels
    do once their patch is visible: the test can fail."""
    full, visible = pair(family)
    img, noise = torch.randn(2, 3, 32, 32), torch.rand(2, N)
    mask, keep = masking(noise, 0.75)
    changed = with_hidden_changed(img, mask)
    assert torch.equal(visible.encode_visible(img, keep), visible.encode_visible(changed, keep))
    assert torch.equal(visible.forward_masked(img, noise=noise).pred, visible.forward_masked(changed, noise=noise).pred)
    every = torch.arange(N).expand(2, N)
    assert not torch.allclose(visible.encode_visible(img, every), visible.encode_visible(changed, every))

    before_visible, before_full = visible.encode_visible(img, keep), full.encode(img, mask)
    with torch.no_grad():
        for model in (full, visible):
            model.mask_token.add_(1.0)
    assert torch.equal(visible.encode_visible(img, keep), before_visible)
    kept = (mask == 0).nonzero(as_tuple=True)
    assert not torch.allclose(full.encode(img, mask)[:, 1:][kept], before_full[:, 1:][kept])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_input_is_the_patch_order_restored(family: str) -> None:
    """decoder_input against a hand-built one: CLS first, the encoder's row of patch j at place 1 + j where j is
    kept, mask_token + the position of place 1 + j where it is hidden; and it is what forward_masked decodes."""
    _, model = pair(family)
    img, noise = torch.randn(2, 3, 32, 32), torch.rand(2, N)
    mask, keep = masking(noise, 0.75)
    latent = torch.randn(2, 1 + keep.shape[1], 64)
    table = sincos_pos_table(64, GRID) if family == "mae" else model.pos.table[0].detach()  # (1 + N, d)
    token = model.mask_token[0, 0].detach()
    by_hand = torch.empty(2, 1 + N, 64)
    for b in range(2):
        by_hand[b, 0] = latent[b, 0]
        slots = {j: i for i, j in enumerate(keep[b].tolist())}
        for j in range(N):
            by_hand[b, 1 + j] = latent[b, 1 + slots[j]] if j in slots else token + table[1 + j]
        assert set(slots) == set((mask[b] == 0).nonzero().flatten().tolist())
    assert torch.equal(model.decoder_input(latent, keep, GRID), by_hand)
    with torch.no_grad():
        by_hand_pred = model.decode(model.decoder_input(model.encode_visible(img, keep), keep, GRID))
    assert torch.equal(model.forward_masked(img, noise=noise).pred, by_hand_pred)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_the_loss_is_the_masked_mse_of_its_prediction(norm_pix_loss: bool) -> None:
    _, model = pair("mae", norm_pix_loss=norm_pix_loss)
    img, noise = torch.randn(2, 3, 32, 32), torch.rand(2, N)
    out = model.forward_masked(img, noise=noise)
    assert torch.equal(out.mask, random_masking(noise, 0.75))
    target = patchify(img, 4)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((out.pred - target) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    assert_close(out.loss, expected)


def test_every_parameter_gets_a_gradient_and_train_forward_is_forward_masked() -> None:
    """DDP needs no find_unused_parameters (the mask token reaches the loss through the decoder), and timm's
    train-mode forward is forward_masked's prediction under the same generator's draw."""
    model = build_mae(MAEConfig(variant="nano", visible_only=True))
    model.forward_masked(torch.randn(2, 3, 32, 32)).loss.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(5)
        masked = model.train()(img)
        torch.manual_seed(5)
        assert_close(masked, unpatchify(model.forward_masked(img).pred, 4, GRID))
        model.eval()
        assert torch.equal(model(img), unpatchify(model.decode(model.encode(img)), 4, GRID))  # eval: nothing hidden


def test_the_masked_step_is_one_graph_of_static_shapes() -> None:
    """The training step (MaskedObjective) and timm's train-mode forward are one graph without breaks; fullgraph
    compiles forward_masked with given noise once for two different masks (no data-dependent shape, no host sync,
    which would break the graph), and the compiled loss and gradients are the eager ones."""
    model = build_mae(MAEConfig(variant="nano", encoder_depth=1, decoder_depth=1, visible_only=True))
    img = torch.randn(4, 3, 32, 32)
    for fn in (MaskedObjective(model), model.train()):
        explained = torch._dynamo.explain(fn)(img)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x, n: model.forward_masked(x, noise=n).loss, fullgraph=True, backend=backend)
    for noise in (torch.rand(4, N), torch.rand(4, N)):
        model.zero_grad()
        loss = compiled(img, noise)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        eager = model.forward_masked(img, noise=noise).loss
        eager.backward()
        assert torch.equal(loss, eager)
        for k, p in model.named_parameters():
            assert_close(grads[k], p.grad, msg=k)
    assert len(graphs) == 1  # the second mask reused the first graph: its shapes did not depend on the mask


@pytest.mark.slow  # ~25 s on 2 cores with a cold inductor cache (~3 s warm)
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_inductor_compiles_the_visible_only_step_whole_to_the_eager_numbers() -> None:
    """torch.compile's default backend, fullgraph: the masked loss and its gradients, against eager."""
    model = build_mae(MAEConfig(variant="nano", encoder_depth=1, decoder_depth=1, visible_only=True))
    img, noise = torch.randn(4, 3, 32, 32), torch.rand(4, N)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, n: model.forward_masked(x, noise=n).loss, fullgraph=True)
    results = []
    for fn in (compiled, lambda x, n: model.forward_masked(x, noise=n).loss):
        model.zero_grad()
        loss = fn(img, noise)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for k in results[1][1]:
        assert_close(results[0][1][k], results[1][1][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["crate_mae_nano", "crate_alpha_mae_nano"])
def test_torchscript_and_fx_of_the_visible_only_names(name: str) -> None:
    """timm.create_model(name, visible_only=True) scripts and FX-traces (then scripts) to the eager function, in eval
    mode and in train mode (the same draw under the same seed), and the traced train graph reaches every parameter."""
    model = make(name, visible_only=True).eval()
    assert model.visible_only
    img = images()
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(model)
    assert_close(scripted(img), model(img))
    traced = _fx(model)
    with torch.no_grad():
        [out] = traced(img).values()
        assert_close(out, model(img))
    for run in (scripted, traced):
        run.train()
        model.train()
        torch.manual_seed(7)
        got = run(img)
        got = got if isinstance(got, torch.Tensor) else next(iter(got.values()))
        torch.manual_seed(7)
        assert_close(got, model(img))
    traced.zero_grad()
    torch.manual_seed(7)
    next(iter(traced(img).values())).mean().backward()
    assert not [n for n, p in traced.named_parameters() if p.grad is None]
    with timm.layers.set_scriptable(True):
        again = torch.jit.script(traced.eval())
    model.eval()
    assert_close(next(iter(again(img).values())), model(img))


def test_the_monitor_and_the_recon_figures_take_the_models_way(digits) -> None:
    """The monitor's held-out loss (fixed noise per key) and the reconstruction figures call forward_masked with
    given noise: unchanged, they measure the visible-only pass of a visible-only model."""
    from crate_mae.config import DataConfig, MonitorConfig
    from crate_mae.data.reader import eval_loader
    from crate_mae.eval.monitor import Monitor, fixed_noise
    from crate_mae.model import resolve_config
    from crate_mae.viz.recon import reconstruct

    full, visible = pair("mae")
    mon = Monitor(MonitorConfig(val_samples=64, knn_k=0, layers_batch=0),
                  resolve_config(MAEConfig(variant="nano", visible_only=True)), train_spec=digits[0],
                  val_spec=digits[1], dist=CPU, seed=0, data=DataConfig(batch_size=32, num_workers=0))
    batch = next(iter(eval_loader(digits[1], 32, batch_size=1000, num_workers=0, labels=False)))  # the whole set
    first = sorted(range(len(batch.keys)), key=batch.keys.__getitem__)[:64]  # the monitor's: first in key order
    imgs, noise = batch.images[first], fixed_noise([batch.keys[i] for i in first], N, 0)
    losses = {}
    with torch.no_grad():
        for model in (full, visible):
            out = model.forward_masked(imgs, noise=noise)
            expected = model.sample_loss(model.normalize(imgs), out.pred, out.mask)
            losses[model.visible_only] = mon.evaluate(model)["heldout_loss"]
            assert losses[model.visible_only] == pytest.approx(expected.double().mean().item(), rel=1e-6)
            assert_close(reconstruct(model, imgs[:4], noise=noise[:4])["loss"], expected[:4])
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)  # the two ways are measured, not one


def test_timm_save_for_hf_round_trips_the_choice(tmp_path: Path) -> None:
    model = timm.create_model("crate_mae_nano", visible_only=True).eval()
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    img, noise = torch.randn(2, 3, 32, 32), torch.rand(2, N)
    assert again.visible_only
    assert torch.equal(again.forward_masked(img, noise=noise).pred, model.forward_masked(img, noise=noise).pred)


# ----------------------------------------------------------------------------- through the stages


def tiny(digits: tuple[str, str], out: Path, name: str, *extra: str):
    """The nano model on the digits demo (the demo config, as a user takes it), 23 steps of 64 in one epoch."""
    return load_config(ROOT / "configs/pretrain/demo.yaml", [
        "model.variant=nano", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}", "data.batch_size=64",
        "data.num_workers=0", "data.shuffle_buffer=64", "optim.epochs=1", "optim.warmup_epochs=0.2", "optim.blr=2e-2",
        f"run.out_dir={out}", f"run.name={name}", "run.log_every=5", "run.ckpt_every=10", "monitor.every=0", *extra])


@pytest.fixture(scope="module")
def visible_run(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a whole visible-only pretraining run (`--set model.visible_only=true`)."""
    out = tmp_path_factory.mktemp("visible")
    run_pretrain(tiny(digits, out, "whole", "model.visible_only=true"))
    return out / "whole"


def test_a_resume_ends_bit_identical_and_keeps_the_choice(digits, visible_run: Path, tmp_path: Path) -> None:
    """Cut at step 10 of 23 (mid-epoch), resumed with visible_only unset (it takes the checkpoint's): the final weights
    are the whole run's, bit for bit, and the saved config records the choice."""
    saved = read_checkpoint(visible_run / "final.pth")
    assert saved.config["model"]["visible_only"] is True and saved.payload["state"]["step"] == 23
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(visible_run / "ckpt-00000010.pth", cut)
    run_pretrain(tiny(digits, tmp_path, "cut", "run.resume=auto"))
    again = read_checkpoint(cut / "final.pth")
    assert again.config["model"]["visible_only"] is True
    for key, value in saved.state.items():
        assert torch.equal(value, again.state[key]), key


def test_a_resume_that_flips_it_is_refused_in_one_line(digits, visible_run: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(visible_run / "ckpt-00000010.pth", cut)
    with pytest.raises(ConfigError) as err:
        run_pretrain(tiny(digits, tmp_path, "cut", "run.resume=auto", "model.visible_only=false"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{cut / 'ckpt-00000010.pth'}: model.visible_only is true in the "
                                                      f"checkpoint but false in the config"), message
    assert sorted(p.name for p in cut.iterdir() if p.suffix == ".pth") == ["ckpt-00000010.pth"]  # nothing written


def test_its_files_load_for_init_from_a_classifier_and_the_viz_commands(digits, visible_run: Path,
                                                                        tmp_path: Path) -> None:
    """Not a resume, so either choice may start from its weights: init_from takes the file's unless set; a
    classifier and the recon viz load its encoder (the recon one keeps the file's choice)."""
    from crate_mae.viz.inputs import load_model

    final, encoder = visible_run / "final.pth", visible_run / "encoder.pth"
    source = read_checkpoint(final).state
    for extra, expected in (((), True), (("model.visible_only=false",), False)):
        run = prepare(tiny(digits, tmp_path, "new", f"pretrain.init_from={final}", *extra), CPU, weights=str(final))
        assert run.cfg.model.visible_only is expected
        trainer, _ = build_training(run.cfg, CPU, run.train, run.weights)
        assert trainer.module.visible_only is expected
        got = trainer.module.state_dict()
        assert all(torch.equal(got[k], v) for k, v in source.items())
    classifier, _ = create_model(ClassifierConfig(num_classes=10), encoder)
    assert torch.equal(classifier.state_dict()["encoder.layers.2.ista.D"], source["encoder.layers.2.ista.D"])
    assert classifier(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 10)
    mae = load_model(checkpoint=str(final), whole_mae=True)
    assert mae.visible_only and torch.equal(mae.state_dict()["decoder_pred.weight"], source["decoder_pred.weight"])
    assert not create_model(MAEConfig(visible_only=False), final)[0].visible_only  # a set value wins, unrefused


def _ddp_rank(rank: int, world: int, port: int, digits: tuple[str, str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    result = run_pretrain(tiny(digits, Path(out), "t", "model.visible_only=true", "model.encoder_depth=1",
                               "model.decoder_depth=1", "run.ckpt_every=1000"))
    torch.save({"steps": result.steps, "model": result.model.state_dict(),
                "visible_only": result.model.visible_only}, Path(out) / f"rank{rank}.pt")


def test_two_process_gloo_ddp_ranks_end_identical(digits, free_port: int, tmp_path: Path) -> None:
    spawn(_ddp_rank, args=(2, free_port, digits, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 1497 // (64 * 2) and r0["visible_only"] and r1["visible_only"]
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key


class _FixedNoiseLoss(torch.nn.Module):
    """The masked loss of given images under given noise: what a rank's step computes, its mask reproducible."""

    def __init__(self, mae: CrateMAE) -> None:
        super().__init__()
        self.model = mae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.forward_masked(images, noise=noise).loss


def _one_step(rank: int, world: int, port: int, out: str) -> None:
    """One SGD step of a visible-only nano MAE on 8 fixed images and masks: the whole batch on 1 process, or half of
    it on each of 2 gloo ranks under DDP."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    if world > 1:
        torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    mae = build_mae(MAEConfig(variant="nano", visible_only=True))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen)
    noise = torch.rand(8, 64, generator=gen)
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    step = _FixedNoiseLoss(mae)
    module = DistributedDataParallel(step) if world > 1 else step
    optimizer = torch.optim.SGD(mae.parameters(), lr=0.5)
    module(images[part], noise[part]).backward()
    optimizer.step()
    torch.save(mae.state_dict(), Path(out) / f"world{world}-rank{rank}.pt")
    if world > 1:
        torch_dist.destroy_process_group()


def test_two_gloo_ranks_take_the_step_one_process_takes(free_port: int, tmp_path: Path) -> None:
    """2 ranks equal 1: each rank gathers its own images' visible patches, and since every image keeps the same
    number of patches the mean of the ranks' losses is the whole batch's, so DDP's averaged gradient is the single
    process's and so are the weights after the step."""
    _one_step(0, 1, free_port, str(tmp_path))
    spawn(_one_step, args=(2, free_port, str(tmp_path)), nprocs=2)
    one = torch.load(tmp_path / "world1-rank0.pt", weights_only=True)
    torch.manual_seed(0)
    initial = build_mae(MAEConfig(variant="nano", visible_only=True)).state_dict()
    for rank in (0, 1):
        two = torch.load(tmp_path / f"world2-rank{rank}.pt", weights_only=True)
        for key, value in one.items():
            assert_close(two[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(one["encoder.layers.0.ista.D"], initial["encoder.layers.0.ista.D"])  # the step moved it

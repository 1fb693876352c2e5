"""The gradient and scaled modes of orthogonal continual LoRA, each against a reference computed another way:
the gradient of a merged copy by plain autograd, the projections and SGP's importance in numpy float64."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from continual_helpers import N_IN, base_model, inputs_only, make_model, task_batches, train_task
from peft import PeftModel

from ortho_adapters import OrthoLoraConfig
from ortho_adapters.continual import OrthoLoraLayer, end_task, start_task

LIN0 = "base_model.model.lin0"  # its inputs are the raw x, so its input covariance is sum x^T x


def layers(model) -> dict[str, OrthoLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLoraLayer)}


def wide_batches(task: int) -> list[dict]:
    """Task data spanning 8 input dimensions, so ``G^T G`` of lin0 has rank above r = 4."""
    return task_batches(task, dim=8)


def run_mode_task(model, name: str, batches: list[dict], steps: int = 30) -> dict[str, int]:
    """``start_task`` with labelled batches (the gradient pass uses the model's loss), AdamW, ``end_task``."""
    start_task(model, name, batches)
    train_task(model, batches, steps=steps)
    return end_task(model, inputs_only(batches))


def reference_gradient(model, batches: list[dict]) -> np.ndarray:
    """``G`` (48 x 32) of lin0 = sum over batches of dL/dW, by autograd on a merged copy (float64)."""
    merged = copy.deepcopy(model).merge_and_unload().eval()
    weight = merged.lin0.weight
    weight.requires_grad_(True)
    for batch in batches:
        merged(**batch)["loss"].backward()
    return weight.grad.double().numpy()


def sgp_importance(m: np.ndarray, lam_old: np.ndarray, cov: np.ndarray, a: float) -> np.ndarray:
    """SGP's importance, written out per direction: ``max(old, a e / ((a - 1) e + e_max))``."""
    e_max = np.linalg.eigvalsh(cov).max()
    out = []
    for i in range(m.shape[1]):
        e = float(m[:, i] @ cov @ m[:, i])
        new = a * e / ((a - 1.0) * e + e_max)
        out.append(max(lam_old[i] if i < len(lam_old) else 0.0, min(new, 1.0)))
    return np.array(out)


def top_right_vectors(mat: np.ndarray, r: int) -> np.ndarray:
    """The top-r right singular vectors (n x r) of ``mat`` by numpy's SVD."""
    return np.linalg.svd(mat)[2][:r].T


# ------------------------------------------------------------------------------------------ gradient mode
def test_gradient_mode_a_follows_the_projected_gradient_and_keeps_bases_untouched_under_adamw():
    model = make_model("gradient")
    run_mode_task(model, "t0", wide_batches(0))
    run_mode_task(model, "t1", wide_batches(1))
    data = wide_batches(2)
    g_ref = reference_gradient(model, data)
    start_task(model, "t2", data)
    assert all(p.grad is None for p in model.parameters()), "the gradient pass must not leave .grad behind"
    layer = layers(model)[LIN0]
    m = layer.basis("default").double().numpy()
    # reference: top-4 right singular vectors of G Q, Q an orthonormal basis of the complement (numpy SVD)
    q = np.linalg.svd(np.eye(N_IN) - m @ m.T)[0][:, : N_IN - m.shape[1]]
    v = q @ top_right_vectors(g_ref @ q, 4)
    a = layer.current_a("default").double().numpy()
    np.testing.assert_allclose(a.T @ a, v @ v.T, atol=1e-5)  # the same row space (signs free)
    # AdamW (with weight decay) moves B only; inputs inside span(M) keep their outputs
    g = torch.Generator().manual_seed(3)
    probes = {n: torch.randn(64, lay.basis("default").shape[1], generator=g) @ lay.basis("default").t()
              for n, lay in layers(model).items()}  # fmt: skip
    with torch.no_grad():
        before = {n: layers(model)[n](x).clone() for n, x in probes.items()}
    train_task(model, data, steps=40, lr=2e-2)
    for name, lay in layers(model).items():
        delta = lay.scaling["default"] * (
            lay.ortho_lora_B["default"].weight.detach().double() @ lay.current_a("default").double()
        )
        assert delta.norm() > 1e-2, "task t2 did not train: the check would be vacuous"
        assert (delta @ lay.basis("default").double()).norm() / delta.norm() < 1e-4, name
        with torch.no_grad():
            rel = (lay(probes[name]) - before[name]).norm() / before[name].norm()
        assert rel < 1e-4, (name, float(rel))


def test_gradient_mode_without_a_loss_raises_and_changes_nothing():
    model = make_model("gradient")
    run_mode_task(model, "t0", task_batches(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no differentiable loss"):
        start_task(model, "t1", inputs_only(task_batches(1)))  # no labels, no loss_fn
    assert model.peft_config["default"].task_names == ["t0"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the same batches with an explicit loss_fn work
    target = torch.zeros(32, dtype=torch.long)
    start_task(
        model,
        "t1",
        inputs_only(task_batches(1)),
        loss_fn=lambda mdl, b: torch.nn.functional.cross_entropy(mdl(**b)["logits"], target),
    )
    assert model.peft_config["default"].task_names == ["t0", "t1"]


# -------------------------------------------------------------------------------------------- scaled mode
def test_scaled_mode_damps_each_basis_direction_by_one_minus_its_importance():
    a_scale = 5.0
    model = make_model("scaled", sgp_scale=a_scale)
    lam_ref = np.zeros(0)
    for t in range(2):
        batches = wide_batches(t)
        run_mode_task(model, f"t{t}", batches)
        x = torch.cat([b["x"] for b in batches]).double().numpy()
        layer = layers(model)[LIN0]
        m = layer.basis("default").double().numpy()
        lam_ref = sgp_importance(m, lam_ref, x.T @ x, a_scale)
        np.testing.assert_allclose(layer.importance("default").double().numpy(), lam_ref, atol=1e-5)
    assert lam_ref.max() > 0.999 and lam_ref.min() < 0.9, "both blocked and half-open directions expected"
    data = wide_batches(2)
    g_ref = reference_gradient(model, data)
    h_ref = g_ref.T @ g_ref
    start_task(model, "t2", data)
    layer = layers(model)[LIN0]
    m = layer.basis("default").double().numpy()
    # reference: P = I - sum_i lam_i u_i u_i^T; V = top-4 eigenvectors of P H P; A = V^T P
    p = np.eye(N_IN)
    for i in range(m.shape[1]):
        p -= lam_ref[i] * np.outer(m[:, i], m[:, i])
    v = np.linalg.eigh(p @ h_ref @ p)[1][:, ::-1][:, :4]
    a = layer.current_a("default").double().numpy()
    np.testing.assert_allclose(a.T @ a, p @ v @ v.T @ p, atol=1e-5)
    # per direction: ||A u_i|| = (1 - lam_i) ||V^T u_i||
    for i in range(m.shape[1]):
        free = np.linalg.norm(v.T @ m[:, i])
        if free > 1e-3:
            assert np.linalg.norm(a @ m[:, i]) == pytest.approx((1 - lam_ref[i]) * free, rel=1e-4, abs=1e-7)
    # after AdamW: the output change along u_i is at most (1 - lam_i) s ||B_t||_2, and 0 where lam_i = 1
    u = torch.from_numpy(m.T).float()
    with torch.no_grad():
        before = layer(u).clone()
    train_task(model, data, steps=40, lr=2e-2)
    with torch.no_grad():
        change = (layer(u) - before).double().norm(dim=1).numpy()
    b = layer.ortho_lora_B["default"].weight.detach().double()
    bound = layer.scaling["default"] * torch.linalg.matrix_norm(b, ord=2).item() * (1 - lam_ref)
    assert np.all(change <= bound + 1e-5), (change, bound)
    assert change[lam_ref > 1 - 1e-9].max() < 1e-5
    assert change.max() > 1e-3, "some half-open direction should move: the check would be vacuous"


def test_scaled_mode_with_a_huge_scale_blocks_every_energetic_direction():
    """``a -> inf`` is the exact mode: every basis direction with task energy gets importance ~1."""
    model = make_model("scaled", sgp_scale=1e12)
    run_mode_task(model, "t0", task_batches(0))
    lam = layers(model)[LIN0].importance("default")
    assert lam.numel() == 3 and bool((lam > 1 - 1e-6).all())  # t0's inputs span 3 dimensions


# ------------------------------------------------------------------------------------ both new modes
@pytest.mark.parametrize("mode", ["gradient", "scaled"])
def test_save_load_round_trip_and_merge(mode, tmp_path):
    model = make_model(mode)
    run_mode_task(model, "t0", task_batches(0))
    run_mode_task(model, "t1", task_batches(1))
    start_task(model, "t2", task_batches(2))
    train_task(model, task_batches(2), steps=5)
    model.save_pretrained(tmp_path / "ad")
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "ad", is_trainable=True)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and any("ortho_lora_M" in k for k in want)
    assert (mode == "scaled") == any("ortho_lora_lam" in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    x = task_batches(7)[0]["x"]
    with torch.no_grad():
        out = model(x=x)["logits"]
        torch.testing.assert_close(loaded(x=x)["logits"], out, rtol=0, atol=0)
    # the reloaded model goes on exactly like the original
    for mdl in (model, loaded):
        end_task(mdl, inputs_only(task_batches(2)))
        start_task(mdl, "t3", task_batches(3))
    for lay, lay2 in zip(layers(model).values(), layers(loaded).values()):
        torch.testing.assert_close(lay2.current_a("default"), lay.current_a("default"), atol=1e-6, rtol=0)
    # merge_and_unload equals the adapter's forward
    with torch.no_grad():
        out = model(x=x)["logits"]
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x=x)["logits"], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["subspace", "gradient", "scaled"])
def test_room_share_caps_each_task_at_a_share_of_the_free_dimensions(mode):
    model = make_model(mode, energy=1.0, room_share=0.5)  # energy 1.0 alone would take all 32 dimensions
    full = [{"x": torch.randn(256, N_IN, generator=torch.Generator().manual_seed(s))} for s in range(2)]
    dims = []
    for t in range(3):
        start_task(model, f"t{t}")
        dims.append(end_task(model, full)[LIN0])
    assert dims == [16, 24, 28]  # floor(0.5 * free) added per task: 32 -> 16 -> 8 -> 4 free
    m = layers(model)[LIN0].basis("default").double()
    torch.testing.assert_close(m.t() @ m, torch.eye(28, dtype=torch.float64), atol=1e-5, rtol=0)  # fp32 M


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "sgp"}, "mode must be one of"),
        ({"mode": "scaled", "sgp_scale": 0}, "sgp_scale must be a finite number > 0"),
        ({"mode": "scaled", "sgp_scale": -2.0}, "sgp_scale"),
        ({"mode": "scaled", "sgp_scale": math.inf}, "sgp_scale"),
        ({"mode": "scaled", "sgp_scale": math.nan}, "sgp_scale"),
        ({"mode": "scaled", "sgp_scale": True}, "sgp_scale"),
        ({"mode": "scaled", "sgp_scale": "10"}, "sgp_scale"),
        ({"mode": "gradient", "energy": 1.5}, "energy"),
        ({"mode": "gradient", "room_share": 0.0}, "room_share must be in"),
        ({"mode": "subspace", "room_share": 1.5}, "room_share"),
        ({"mode": "scaled", "room_share": False}, "room_share"),
    ],
)
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthoLoraConfig(target_modules=["lin0"], **kwargs)

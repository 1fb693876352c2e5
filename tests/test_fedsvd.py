"""FedSVD (arXiv 2505.12805): the layer (frozen orthonormal A, trainable B leaf) and the server step."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from saved_tensors import owned_storages, saved_activation_values
from torch import nn

import ortho_adapters
from ortho_adapters.fedsvd import FedSVDLayer, aggregate, average_trainable
from ortho_adapters.fedsvd.layer import random_orthonormal_rows


def _model(r: int = 4, seed: int = 0, **kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    return get_peft_model(
        base, ortho_adapters.FedSVDConfig(r=r, target_modules=["0", "2"], init_seed=seed, **kw)
    )


def test_a_is_seeded_orthonormal_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model = _model()
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state)  # sanity of the reference
    layers = [m for m in model.modules() if isinstance(m, FedSVDLayer)]
    assert len(layers) == 2
    for layer in layers:
        a = layer.fedsvd_A["default"]
        torch.testing.assert_close(a @ a.t(), torch.eye(4), rtol=0, atol=1e-6)
        assert not layer.fedsvd_B["default"].weight.any()
        assert type(layer.fedsvd_B["default"]) is nn.Linear  # Opacus' native grad sampler applies
    assert not torch.equal(layers[0].fedsvd_A["default"][:, :12], layers[1].fedsvd_A["default"][:, :12])
    again = _model()
    other = _model(seed=1)
    key = "base_model.model.0.fedsvd_A"
    sd, sd_again, sd_other = (get_peft_model_state_dict(m) for m in (model, again, other))
    assert torch.equal(sd[key], sd_again[key]) and not torch.equal(sd[key], sd_other[key])
    # creating the adapter does not consume the global RNG
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    random_orthonormal_rows(4, 12, seed=5)
    _model()
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), expected)


def test_state_dict_keys_and_only_b_trains():
    model = _model()
    sd = get_peft_model_state_dict(model)
    assert sorted(sd) == [
        "base_model.model.0.fedsvd_A",
        "base_model.model.0.fedsvd_B.weight",
        "base_model.model.2.fedsvd_A",
        "base_model.model.2.fedsvd_B.weight",
    ]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.0.fedsvd_B.default.weight",
        "base_model.model.2.fedsvd_B.default.weight",
    ]


@pytest.mark.parametrize("tokens", [64, 512])
def test_saved_activations_are_at_most_t_times_r(tokens):
    torch.manual_seed(0)
    n, m, r = 96, 80, 8
    model = get_peft_model(
        nn.Sequential(nn.Linear(n, m)), ortho_adapters.FedSVDConfig(r=r, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    owned = owned_storages(model)
    x = torch.randn(tokens, n, requires_grad=True)
    base_only = saved_activation_values(lambda: layer.base_layer(x), owned)
    adapted = saved_activation_values(lambda: layer(x), owned)
    assert 0 < adapted - base_only <= tokens * r  # u = x A^T, nothing of size T x n


# ----- server step ------------------------------------------------------------------------------------------


def _states(n_clients: int = 3, seed: int = 0, m: int = 16, n: int = 12, r: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = random_orthonormal_rows(r, n, seed=seed).to(dtype)
    glob = {
        "layer.fedsvd_A": a,
        "layer.fedsvd_B.weight": torch.randn(m, r, generator=g).to(dtype),
        "head.weight": torch.randn(2, m, generator=g).to(dtype),
    }
    clients = [
        {
            "layer.fedsvd_A": a.clone(),
            "layer.fedsvd_B.weight": torch.randn(m, r, generator=g).to(dtype),
            "head.weight": torch.randn(2, m, generator=g).to(dtype),
        }
        for _ in range(n_clients)
    ]
    return glob, clients


def _snapshot(glob, clients):
    return {k: v.clone() for k, v in glob.items()}, [{k: v.clone() for k, v in c.items()} for c in clients]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # NaN == NaN bitwise


def _bit_identical(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k]))
        for k in a
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aggregate_is_orthonormal_and_preserves_the_weighted_product(dtype):
    glob, clients = _states(dtype=dtype)
    counts = [10, 30, 60]
    new = aggregate(glob, clients, counts)
    a_new, b_new = new["layer.fedsvd_A"], new["layer.fedsvd_B.weight"]
    assert a_new.dtype == dtype and b_new.dtype == dtype
    torch.testing.assert_close(a_new @ a_new.t(), torch.eye(4, dtype=dtype), rtol=0, atol=1e-5)
    w = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    a_old = glob["layer.fedsvd_A"].double()
    expected = sum(wk * c["layer.fedsvd_B.weight"].double() @ a_old for wk, c in zip(w, clients))
    torch.testing.assert_close((b_new.double() @ a_new.double()), expected, rtol=0, atol=1e-5)
    # B_new = U S: orthogonal columns with non-increasing norms (the singular values)
    gram = b_new.double().t() @ b_new.double()
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-5)
    norms = b_new.double().norm(dim=0)
    assert (norms[:-1] >= norms[1:] - 1e-9).all()
    # the new A spans the old A's row space (with plain SGD FedSVD = FFA-LoRA with orthonormal A0)
    proj = a_new.double() @ a_old.t() @ a_old
    torch.testing.assert_close(proj, a_new.double(), rtol=0, atol=1e-5)
    # the other trainable tensors are the weighted average
    head = sum(wk * c["head.weight"].double() for wk, c in zip(w, clients)).to(dtype)
    torch.testing.assert_close(new["head.weight"], head, rtol=0, atol=1e-6)


def test_aggregate_matches_a_full_svd_of_the_product():
    glob, clients = _states(seed=3)
    new = aggregate(glob, clients, [1, 1, 1])
    b_avg = sum(c["layer.fedsvd_B.weight"].double() for c in clients) / 3
    u, s, vh = torch.linalg.svd(b_avg @ glob["layer.fedsvd_A"].double(), full_matrices=False)
    torch.testing.assert_close(new["layer.fedsvd_B.weight"].double().norm(dim=0), s[:4], rtol=0, atol=1e-5)
    # the singular vectors agree up to sign
    signs = torch.sign((new["layer.fedsvd_A"].double() * vh[:4]).sum(1))
    torch.testing.assert_close(new["layer.fedsvd_A"].double(), vh[:4] * signs[:, None], rtol=0, atol=1e-5)


def _bad_nan(c):
    c["layer.fedsvd_B.weight"][0, 0] = float("nan")


def _bad_shape(c):
    c["layer.fedsvd_B.weight"] = torch.zeros(16, 5)


def _bad_dtype(c):
    c["head.weight"] = c["head.weight"].double()


def _bad_a(c):
    c["layer.fedsvd_A"][0, 0] += 1e-3


def _bad_missing(c):
    del c["head.weight"]


@pytest.mark.parametrize(
    "corrupt,tensor,message",
    [
        (_bad_nan, "layer.fedsvd_B.weight", "NaN"),
        (_bad_shape, "layer.fedsvd_B.weight", "shape"),
        (_bad_dtype, "head.weight", "dtype"),
        (_bad_a, "layer.fedsvd_A", "frozen"),
        (_bad_missing, "head.weight", "missing"),
    ],
)
def test_bad_update_raises_naming_client_and_tensor_and_inputs_unchanged(corrupt, tensor, message):
    glob, clients = _states()
    corrupt(clients[1])
    before_glob, before_clients = _snapshot(glob, clients)
    with pytest.raises(ValueError) as err:
        aggregate(glob, clients, [5, 5, 5], client_names=["alice", "bob", "carol"])
    text = str(err.value)
    assert "bob" in text and tensor in text and message in text, text
    assert _bit_identical(glob, before_glob)
    assert all(_bit_identical(c, b) for c, b in zip(clients, before_clients))


@pytest.mark.parametrize("counts", [[5, 0, 5], [5, -1, 5], [5, 2.5, 5]])
def test_non_positive_example_count_raises(counts):
    glob, clients = _states()
    with pytest.raises(ValueError, match="client 1.*number of examples"):
        aggregate(glob, clients, counts)


def test_good_aggregate_leaves_inputs_bit_identical():
    glob, clients = _states()
    before_glob, before_clients = _snapshot(glob, clients)
    aggregate(glob, clients, [3, 4, 5])
    average_trainable(glob, clients, [3, 4, 5], frozen_keys=["layer.fedsvd_A"])
    assert _bit_identical(glob, before_glob)
    assert all(_bit_identical(c, b) for c, b in zip(clients, before_clients))


def test_aggregate_of_a_real_model_reloads_and_gives_the_averaged_function():
    """Aggregating real PEFT state dicts: the new global adapter computes the averaged update."""
    from peft import set_peft_model_state_dict

    glob_model = _model(init_weights=False)
    glob = {k: v.clone() for k, v in get_peft_model_state_dict(glob_model).items()}  # the dict shares storage
    clients = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        clients.append(
            {
                k: (v + torch.randn(v.shape, generator=g) if "fedsvd_B" in k else v.clone())
                for k, v in glob.items()
            }
        )
    new = aggregate(glob, clients, [1, 2, 3])
    set_peft_model_state_dict(glob_model, new)
    layer = glob_model.base_model.model[0]
    w = [1 / 6, 2 / 6, 3 / 6]
    a = glob["base_model.model.0.fedsvd_A"]
    expected = sum(wk * c["base_model.model.0.fedsvd_B.weight"] @ a for wk, c in zip(w, clients))
    torch.testing.assert_close(layer.delta_weight("default"), expected, rtol=0, atol=1e-5)


def test_average_trainable_keeps_frozen_keys():
    glob, clients = _states()
    new = average_trainable(glob, clients, [1, 1, 2], frozen_keys=["layer.fedsvd_A"])
    assert torch.equal(new["layer.fedsvd_A"], glob["layer.fedsvd_A"])
    expected = (clients[0]["layer.fedsvd_B.weight"] + clients[1]["layer.fedsvd_B.weight"]) / 4 + clients[2][
        "layer.fedsvd_B.weight"
    ] / 2
    torch.testing.assert_close(new["layer.fedsvd_B.weight"], expected, rtol=0, atol=1e-6)

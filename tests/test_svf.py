import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from chameleon import Config
from chameleon.adapters.lora import trainable_parameters
from chameleon.adapters.experts import cem_search
from chameleon.adapters.svf import SVF, SVFExperts, decompose, matrix, mix, target_layers
from chameleon.reinforce import answer_kl, reinforce_step, sequence_log_probs


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def random_z(svf: SVF, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 2 * torch.randn(svf[n].S.shape, generator=g) for n in svf.names}


def experts(model, tmp_path, k=1) -> SVFExperts:
    """The kit's SVF component on `model`, as `build` makes it for the svf regimes."""
    return SVFExperts(Config.from_profile("smoke", backbone="gpt2-tiny", regime="svf", data_dir=tmp_path), model, k)


def forward(model, e: SVFExperts, ids, path: str):
    """Logits with the selected expert applied one of the two ways `SVFExperts.body` has: factored, with
    gradients (training), or W' built once, without (evaluation)."""
    with torch.set_grad_enabled(path == "factored"):
        return model.lm_head(e.body(model, input_ids=ids).last_hidden_state)


def test_targets_and_svd_round_trip(tiny_gpt2):
    assert list(target_layers(tiny_gpt2)) == [f"transformer.h.{i}.mlp.{m}" for i in (0, 1) for m in ("c_fc", "c_proj")]
    assert len(target_layers(tiny_gpt2, "mlp+attn")) == 8
    assert [n.rsplit(".", 1)[1] for n in target_layers(tiny_llama())][:3] == ["gate_proj", "up_proj", "down_proj"]
    svd = decompose(tiny_gpt2)
    for name, (U, S, Vh) in svd.items():
        W = matrix(tiny_gpt2.get_submodule(name))
        k = min(W.shape)
        assert U.shape == (W.shape[0], k) and S.shape == (k,) and Vh.shape == (k, W.shape[1])
        assert torch.allclose(U @ torch.diag(S) @ Vh, W, atol=1e-6)
    # the (out, in) orientation: c_fc maps 32 -> 128 and stores its weight as (in, out) = (32, 128)
    assert svd["transformer.h.0.mlp.c_fc"][0].shape == (128, 32)


def test_rescaling_formula_against_a_float64_reference(tiny_gpt2):
    svf = SVF(decompose(tiny_gpt2))
    for name, z in random_z(svf).items():
        U, S, Vh = (t.double() for t in (svf[name].U, svf[name].S, svf[name].Vh))
        m = torch.sigmoid(z.double())
        reference = U @ torch.diag(S * m) @ Vh * (S.sum() / (S * m).sum())
        assert torch.allclose(svf.weight(name, z).double(), reference, atol=1e-6)


def test_init_and_trainable_parameter_count(tiny_gpt2, tmp_path):
    e = experts(tiny_gpt2, tmp_path, k=2)
    for k in range(2):
        z = torch.cat(list(e.expert(k).values()))
        assert abs(z.mean() - 0.1) < 0.005 and 0.005 < z.std() < 0.015  # 0.1 + N(0, 0.01^2)
    assert not torch.equal(*(torch.cat(list(e.expert(k).values())) for k in range(2)))  # drawn per expert
    expected = sum(min(matrix(m).shape) for m in target_layers(tiny_gpt2).values())
    assert e.per_expert() == expected == 2 * (32 + 32) and trainable_parameters(e) == 2 * expected


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_constant_mask_gives_the_original_weights_and_logits(tiny_gpt2, tmp_path, make):
    model = (tiny_gpt2 if make == "gpt2" else tiny_llama()).requires_grad_(False)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        base = model(ids).logits
    e = experts(model, tmp_path)
    with torch.no_grad():
        for z in e.expert(0).values():
            z.fill_(3.7)
    for name, z in e.expert(0).items():
        assert torch.allclose(e.svf.weight(name, z), matrix(model.get_submodule(name)), atol=1e-6)
    for path in ("factored", "built"):
        assert torch.allclose(forward(model, e, ids, path), base, atol=1e-5)


@pytest.mark.parametrize("path", ["factored", "built"])
def test_conv1d_forward_equals_a_manual_computation(tiny_gpt2, tmp_path, path):
    """The adapted GPT-2 MLP equals gelu(x W_fc'^T + b) W_proj'^T + b, with W' (out, in) built by hand."""
    e = experts(tiny_gpt2.requires_grad_(False), tmp_path)
    with torch.no_grad():
        for name, z in e.expert(0).items():
            z.copy_(random_z(e.svf)[name])
    mlp = tiny_gpt2.transformer.h[0].mlp
    x = torch.randn(3, 5, 32)

    def adapted(name):  # by hand from the layer's stored (in, out) weight, in float64
        W = mlp.get_submodule(name).weight.detach().double().T  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        m = torch.sigmoid(e.expert(0)[f"transformer.h.0.mlp.{name}"].detach().double())
        return U @ torch.diag(S * m) @ Vh * (S.sum() / (S * m).sum())

    h = torch.nn.functional.gelu(x.double() @ adapted("c_fc").T + mlp.c_fc.bias.double(), approximate="tanh")
    manual = h @ adapted("c_proj").T + mlp.c_proj.bias.double()
    with torch.no_grad():
        plain = mlp(x).double()
    if path == "factored":
        with torch.no_grad(), e.svf.factored(tiny_gpt2, e.zs()):
            out = mlp(x).double()
    else:  # the W' that SVFExperts.weights builds for the body, keyed by body parameter name
        with torch.no_grad():
            w = {k.split("h.0.mlp.")[1]: v for k, v in e.weights().items() if "h.0.mlp." in k}
            out = torch.func.functional_call(mlp, w, (x,)).double()
    assert torch.allclose(out, manual, atol=1e-5)
    assert not torch.allclose(plain, manual, atol=1e-3)  # the z's do change the MLP


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_the_two_paths_agree_in_values_and_gradients(tiny_gpt2, tmp_path, make):
    """Factored (x -> Vh x -> s' * -> U, never forming W') against W' built from z and run with
    functional_call: same logits and z-gradients for Conv1D and Linear; every layer has its own forward
    back afterwards, also after an exception, and the model's weights are the same objects, unchanged."""
    model = (tiny_gpt2 if make == "gpt2" else tiny_llama()).requires_grad_(False)
    weights = {n: (m.weight, m.weight.detach().clone(), m.bias) for n, m in target_layers(model).items()}
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        base = model(ids).logits
    e = experts(model, tmp_path)
    with torch.no_grad():
        for name, z in e.expert(0).items():
            z.copy_(random_z(e.svf)[name])
    factored = forward(model, e, ids, "factored")
    factored.pow(2).mean().backward()  # after the block: the graph outlives it
    grads = {n: z.grad.clone() for n, z in e.expert(0).items()}
    e.zero_grad()
    built = torch.func.functional_call(model.base_model, {e.keys[n]: (e.svf.weight(n, z).T if e.conv1d[n] else
                                                                     e.svf.weight(n, z)) for n, z in e.zs().items()},
                                       args=(), kwargs={"input_ids": ids}).last_hidden_state
    model.lm_head(built).pow(2).mean().backward()
    assert torch.allclose(factored, forward(model, e, ids, "built"), atol=1e-5)
    for n, z in e.expert(0).items():
        assert torch.allclose(grads[n], z.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="boom"), e.svf.factored(model, e.zs()):
        raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in target_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    for name, layer in target_layers(model).items():
        w, value, b = weights[name]
        assert layer.weight is w and torch.equal(w, value) and layer.bias is b


def test_built_weights_are_rebuilt_when_z_changes(tiny_gpt2, tmp_path):
    """W' is kept per selection, and an in-place update of z (an optimiser step) is never served stale."""
    e = experts(tiny_gpt2.requires_grad_(False), tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    before = forward(tiny_gpt2, e, ids, "built")
    with torch.no_grad():
        assert e.weights() is e.weights()  # built once without gradients
    assert e.weights() is not e.weights()  # with gradients, anew: each caller's graph is its own
    with torch.no_grad():
        for name, z in e.expert(0).items():
            z.copy_(random_z(e.svf)[name])
    assert torch.allclose(forward(tiny_gpt2, e, ids, "built"), forward(tiny_gpt2, e, ids, "factored"), atol=1e-5)
    assert not torch.allclose(forward(tiny_gpt2, e, ids, "built"), before, atol=1e-3)


def test_cache_is_keyed_checked_and_rebuilt(tiny_gpt2, tmp_path, monkeypatch):
    svd = decompose(tiny_gpt2, cache_dir=tmp_path)
    files = list((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    again = decompose(tiny_gpt2, cache_dir=tmp_path)
    assert not calls and all(torch.equal(a, b) for n in svd for a, b in zip(svd[n], again[n]))  # read back

    files[0].write_bytes(b"not a safetensors file")  # corrupt: warned about and rebuilt
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = decompose(tiny_gpt2, cache_dir=tmp_path)
    assert len(calls) == 4 and all(torch.equal(a, b) for n in svd for a, b in zip(svd[n], rebuilt[n]))

    from safetensors import safe_open  # right key, wrong shapes: rebuilt too
    with safe_open(files[0], "pt") as f:
        meta = f.metadata()
    tensors = {f"{n}.{p}": t for n, usv in svd.items() for p, t in zip(("U", "S", "Vh"), usv)}
    tensors["transformer.h.0.mlp.c_fc.S"] = torch.ones(5)
    save_file(tensors, files[0], metadata=meta)
    with pytest.warns(UserWarning, match="shapes"):
        decompose(tiny_gpt2, cache_dir=tmp_path)
    save_file(tensors, files[0], metadata={"key": "another backbone"})
    with pytest.warns(UserWarning, match="key"):
        decompose(tiny_gpt2, cache_dir=tmp_path)

    other = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_proj.weight[0, 0] += 1
    decompose(other, cache_dir=tmp_path)  # other weights: another file
    decompose(tiny_gpt2, "mlp+attn", cache_dir=tmp_path)  # other targets: another file
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 3


def test_mix_normalises_alpha():
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 1.0])}
    assert torch.allclose(mix([a, b], [0.2, 0.6])["w"], torch.tensor([0.25, 0.75]))
    assert torch.allclose(mix([a, b], [0.0, 0.0])["w"], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        mix([a, b], [1.0, -1.0])


def test_cem_finds_a_known_maximum():
    target = torch.tensor([0.2, 0.9, 0.5])
    calls = []

    def score(alpha):
        calls.append(1)
        return -((alpha - target) ** 2).sum().item()

    best = cem_search(score, 3, population=32, elite_ratio=0.2, iters=10, seed=0)
    assert len(calls) == 320 and torch.allclose(best, target, atol=0.03)


def test_cem_breaks_ties_by_log_likelihood():
    """Accuracy is 1 on a wide flat region; among those ties the log-likelihood peaks at `target`."""
    target = torch.tensor([0.3, 0.8])
    best = cem_search(lambda a: (float(a[1] > a[0]), -((a - target) ** 2).sum().item()), 2, iters=12, seed=1)
    assert torch.allclose(best, target, atol=0.05)


def test_reinforce_raises_the_expected_reward(tiny_gpt2, tmp_path):
    """Policy: tiny GPT-2 with SVF picks one of 4 answer tokens after a fixed prompt; answer 2 is rewarded."""
    model = tiny_gpt2.requires_grad_(False)
    prompt, answers = torch.tensor([[11, 22, 33]]), torch.tensor([5, 6, 7, 8])
    e = experts(model, tmp_path)
    opt = torch.optim.Adam(e.parameters(), lr=0.05)

    def answer_logits():
        with e.svf.factored(model, e.zs()):
            return model(prompt).logits[0, -1, answers]

    def expected_reward():
        with torch.no_grad():
            return answer_logits().softmax(-1)[2].item()

    g = torch.Generator().manual_seed(0)
    before = expected_reward()
    for _ in range(15):
        with torch.no_grad():
            picks = torch.multinomial(answer_logits().softmax(-1), 32, replacement=True, generator=g)
        log_probs = answer_logits().log_softmax(-1)[picks]  # log p(sampled answer), graph into z
        stats = reinforce_step(opt, log_probs, (picks == 2).float())
        assert stats["grad_norm"] > 0
    assert expected_reward() > before + 0.02


def test_sequence_log_probs_and_kl(tiny_gpt2, tmp_path):
    ids = torch.tensor([[1, 2, 3, 4, 50256], [5, 6, 7, 8, 9]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    answer = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    e = experts(tiny_gpt2.requires_grad_(False), tmp_path)
    z = random_z(e.svf)
    with torch.no_grad():
        _, ref = sequence_log_probs(tiny_gpt2, ids, attention, answer)  # the unadapted backbone
        with e.svf.factored(tiny_gpt2, z):
            lp, logp = sequence_log_probs(tiny_gpt2, ids, attention, answer)
            logits = tiny_gpt2(ids, attention_mask=attention).logits.log_softmax(-1)
    assert torch.allclose(lp[0], logits[0, 1, 3] + logits[0, 2, 4], atol=1e-5)  # tokens 3 and 4 of row 0
    kl = answer_kl(logp, ref, answer)
    assert (kl > 0).all() and torch.allclose(answer_kl(ref, ref, answer), torch.zeros(2), atol=1e-6)

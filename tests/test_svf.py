import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from chameleon.lora import trainable_parameters
from chameleon.svf import (SVF, answer_kl, cem_search, classify, decompose, matrix, mix, reinforce_step,
                           sequence_log_probs, target_layers, train_expert)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def random_z(svf, seed=1):
    g = torch.Generator().manual_seed(seed)
    svf.load_expert({n: 2 * torch.randn(z.shape, generator=g) for n, z in svf.expert().items()})


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
    svf = SVF(decompose(tiny_gpt2), generator=0)
    random_z(svf)
    for name, z in svf.expert().items():
        U, S, Vh = (t.double() for t in (svf[name].U, svf[name].S, svf[name].Vh))
        m = torch.sigmoid(z.double())
        reference = U @ torch.diag(S * m) @ Vh * (S.sum() / (S * m).sum())
        assert torch.allclose(svf.weight(name).double(), reference, atol=1e-6)


def test_init_and_trainable_parameter_count(tiny_gpt2):
    svf = SVF.from_model(tiny_gpt2, generator=0)
    z = torch.cat(list(svf.expert().values()))
    assert abs(z.mean() - 0.1) < 0.005 and 0.005 < z.std() < 0.015  # 0.1 + N(0, 0.01^2)
    expected = sum(min(matrix(m).shape) for m in target_layers(tiny_gpt2).values())
    assert trainable_parameters(svf) == expected == 2 * (32 + 32)
    model = copy.deepcopy(tiny_gpt2).requires_grad_(False)
    svf.attach(model)
    assert trainable_parameters(model) == expected  # the z's are counted once, inside the model too


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_constant_mask_gives_the_original_weights_and_logits(tiny_gpt2, make):
    model = tiny_gpt2 if make == "gpt2" else tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        base = model(ids).logits
    svf = SVF.from_model(model)
    svf.load_expert({n: torch.full_like(z, 3.7) for n, z in svf.expert().items()})
    for name in svf.names:
        assert torch.allclose(svf.weight(name), matrix(model.get_submodule(name)), atol=1e-6)
    with torch.no_grad(), svf.attached(model):
        assert torch.allclose(model(ids).logits, base, atol=1e-5)


def test_conv1d_forward_equals_a_manual_computation(tiny_gpt2):
    """The attached GPT-2 MLP equals gelu(x W_fc'^T + b) W_proj'^T + b, with W' (out, in) built by hand."""
    svf = SVF.from_model(tiny_gpt2)
    random_z(svf)
    mlp = tiny_gpt2.transformer.h[0].mlp
    x = torch.randn(3, 5, 32)

    def adapted(name):  # by hand from the layer's stored (in, out) weight, in float64
        W = mlp.get_submodule(name).weight.detach().double().T  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        m = torch.sigmoid(svf.expert()[f"transformer.h.0.mlp.{name}"].double())
        return U @ torch.diag(S * m) @ Vh * (S.sum() / (S * m).sum())

    h = torch.nn.functional.gelu(x.double() @ adapted("c_fc").T + mlp.c_fc.bias.double(), approximate="tanh")
    manual = h @ adapted("c_proj").T + mlp.c_proj.bias.double()
    with torch.no_grad():
        plain = mlp(x).double()
        with svf.attached(tiny_gpt2):
            assert torch.allclose(mlp(x).double(), manual, atol=1e-5)
    assert not torch.allclose(plain, manual, atol=1e-3)  # the z's do change the MLP


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_factored_forward_equals_the_attached_one_in_values_and_gradients(tiny_gpt2, make):
    """x -> Vh x -> s' * -> U, never forming W': same logits and z-gradients as rebuilding W' (Conv1D and Linear),
    and every layer has its own forward back afterwards, also after an exception."""
    model = (tiny_gpt2 if make == "gpt2" else tiny_llama()).requires_grad_(False)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        base = model(ids).logits
    svf = SVF.from_model(model)
    random_z(svf)
    grads = {}
    for mode in ("attached", "factored"):
        svf.zero_grad()
        with getattr(svf, mode)(model):
            logits = model(ids).logits
        logits.pow(2).mean().backward()  # after the block: the graph outlives it
        grads[mode] = (logits.detach(), {n: svf[n].z.grad.clone() for n in svf.names})
    assert torch.allclose(grads["factored"][0], grads["attached"][0], atol=1e-5)
    for n in svf.names:
        assert torch.allclose(grads["factored"][1][n], grads["attached"][1][n], rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="boom"), svf.factored(model):
        raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in target_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    with svf.attached(model), pytest.raises(ValueError, match="detach it"), svf.factored(model):
        pass


def test_attach_merge_and_restore_are_exact_and_leave_biases_alone(tiny_gpt2):
    ids = torch.randint(0, 50_257, (2, 7))
    layers = target_layers(tiny_gpt2)
    weights = {n: m.weight for n, m in layers.items()}
    values = {n: m.weight.detach().clone() for n, m in layers.items()}
    biases = {n: m.bias for n, m in layers.items()}
    bias_values = {n: m.bias.detach().clone() for n, m in layers.items()}
    svf = SVF.from_model(tiny_gpt2)
    random_z(svf)
    with torch.no_grad():
        base = tiny_gpt2(ids).logits
        with svf.attached(tiny_gpt2):
            attached = tiny_gpt2(ids).logits
            with svf.disabled():  # the reference policy for a KL term sees the original weights
                assert torch.equal(tiny_gpt2(ids).logits, base)
        with svf.merged(tiny_gpt2):
            assert torch.allclose(tiny_gpt2(ids).logits, attached, atol=1e-5)
            assert not torch.allclose(attached, base, atol=1e-3)
        with pytest.raises(RuntimeError, match="boom"), svf.merged(tiny_gpt2):
            raise RuntimeError("boom")  # an exception inside must restore as well
        assert torch.equal(tiny_gpt2(ids).logits, base)
    for name, layer in layers.items():
        assert type(layer) is Conv1D and layer.weight is weights[name] and torch.equal(layer.weight, values[name])
        assert layer.bias is biases[name] and torch.equal(layer.bias, bias_values[name])


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


def test_classify_picks_the_nearest_centroid():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert classify(torch.tensor([[0.9, 0.1], [0.2, 0.7]]), centroids).tolist() == [0, 1]


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


def test_reinforce_raises_the_expected_reward(tiny_gpt2):
    """Policy: tiny GPT-2 with SVF picks one of 4 answer tokens after a fixed prompt; answer 2 is rewarded."""
    model = tiny_gpt2.requires_grad_(False)
    prompt, answers = torch.tensor([[11, 22, 33]]), torch.tensor([5, 6, 7, 8])
    svf = SVF.from_model(model, generator=0).attach(model)
    opt = torch.optim.Adam(svf.parameters(), lr=0.05)

    def answer_logits():
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


def test_sequence_log_probs_and_kl(tiny_gpt2):
    ids = torch.tensor([[1, 2, 3, 4, 50256], [5, 6, 7, 8, 9]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    answer = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    svf = SVF.from_model(tiny_gpt2)
    random_z(svf)
    with torch.no_grad(), svf.attached(tiny_gpt2):
        lp, logp = sequence_log_probs(tiny_gpt2, ids, attention, answer)
        with svf.disabled():
            _, ref = sequence_log_probs(tiny_gpt2, ids, attention, answer)
        logits = tiny_gpt2(ids, attention_mask=attention).logits.log_softmax(-1)
    assert torch.allclose(lp[0], logits[0, 1, 3] + logits[0, 2, 4], atol=1e-5)  # tokens 3 and 4 of row 0
    kl = answer_kl(logp, ref, answer)
    assert (kl > 0).all() and torch.allclose(answer_kl(ref, ref, answer), torch.zeros(2), atol=1e-6)


def test_next_token_training_lowers_the_loss_and_trains_z_only(tiny_gpt2):
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(2)]
    before = {n: p.detach().clone() for n, p in tiny_gpt2.named_parameters()}
    svf = SVF.from_model(tiny_gpt2, generator=0)
    losses = train_expert(tiny_gpt2, svf, batches, epochs=8, lr=0.05)
    assert losses[-2:] < losses[:2] and sum(losses[-2:]) < sum(losses[:2]) - 0.01
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.named_parameters())  # detached, backbone untouched
    assert not torch.allclose(torch.cat(list(svf.expert().values())), torch.tensor(0.1), atol=0.05)

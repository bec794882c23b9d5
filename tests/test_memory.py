"""`rlhf estimate-memory`: hand-computed figures, exact parameter counts against real models, the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from rlhf.errors import UserError
from rlhf.runtime import memory
from rlhf.runtime.memory import GB, ParamCounts

# A 7e9-parameter model, all of it in block linear layers (round numbers to compute by hand).
P7 = ParamCounts(total=7_000_000_000, linear=7_000_000_000, embeddings=0, lora_in_out=10_000_000)


def gpu_gb(terms):
    return {k: t.gpu / GB for k, t in terms.items()}


def cpu_gb(terms):
    return {k: t.cpu / GB for k, t in terms.items()}


# --- model states, by hand ------------------------------------------------------------------------

def test_full_zero0_one_gpu_is_16_bytes_per_param():
    got = gpu_gb(memory.model_state_bytes(P7, "full", zero=0, gpus=1))
    assert got == pytest.approx({"weights": 14, "gradients": 14, "optimizer": 84})


@pytest.mark.parametrize("zero, sharded", [(0, set()), (1, {"optimizer"}), (2, {"optimizer", "gradients"}),
                                           (3, {"optimizer", "gradients", "weights"})])
def test_zero_stage_shards_its_terms_over_the_gpus(zero, sharded):
    got = gpu_gb(memory.model_state_bytes(P7, "full", zero=zero, gpus=8))
    one_gpu = {"weights": 14, "gradients": 14, "optimizer": 84}
    assert got == pytest.approx({k: v / 8 if k in sharded else v for k, v in one_gpu.items()})


def test_lora_base_is_sharded_only_by_zero3_and_adapters_take_16_bytes():
    # r=16 -> 16 * 1e7 = 1.6e8 adapter params: 0.32 GB bf16 weights, 0.32 GB grads, 1.92 GB Adam states.
    z2 = gpu_gb(memory.model_state_bytes(P7, "lora", zero=2, gpus=4, lora_r=16))
    assert z2 == pytest.approx({"weights": 14 + 0.32, "gradients": 0.32 / 4, "optimizer": 1.92 / 4})
    z3 = gpu_gb(memory.model_state_bytes(P7, "lora", zero=3, gpus=4, lora_r=16))
    assert z3 == pytest.approx({"weights": (14 + 0.32) / 4, "gradients": 0.32 / 4, "optimizer": 1.92 / 4})


def test_qlora_base_is_half_a_byte_plus_constants_and_non_linear_stays_bf16():
    params = ParamCounts(total=8_000_000_000, linear=7_000_000_000, embeddings=1_000_000_000, lora_in_out=0)
    got = gpu_gb(memory.model_state_bytes(params, "qlora", zero=0, gpus=1, lora_r=8))
    # NF4 0.5 B + 0.127 bit of double-quantised constants per linear weight; 1e9 embedding params at 2 B.
    assert memory.QUANT_CONSTANT_BITS == pytest.approx(0.127, abs=5e-4)
    assert got["weights"] == pytest.approx(7 * (0.5 + 0.127 / 8) + 2, rel=1e-3)
    assert got["gradients"] == got["optimizer"] == 0
    z3 = gpu_gb(memory.model_state_bytes(params, "qlora", zero=3, gpus=2, lora_r=8))
    assert z3["weights"] == pytest.approx(got["weights"] / 2)


def test_offload_moves_terms_to_cpu_and_needs_the_right_zero_stage():
    opt = memory.model_state_bytes(P7, "full", zero=2, gpus=4, offload="optimizer")
    assert gpu_gb(opt) == pytest.approx({"weights": 14, "gradients": 3.5, "optimizer": 0})
    assert cpu_gb(opt) == pytest.approx({"weights": 0, "gradients": 0, "optimizer": 21})
    everything = memory.model_state_bytes(P7, "full", zero=3, gpus=4, offload="all")
    assert gpu_gb(everything) == pytest.approx({"weights": 0, "gradients": 3.5, "optimizer": 0})
    assert cpu_gb(everything) == pytest.approx({"weights": 3.5, "gradients": 0, "optimizer": 21})
    with pytest.raises(UserError, match="--offload optimizer needs --zero"):
        memory.model_state_bytes(P7, "full", zero=0, gpus=1, offload="optimizer")
    with pytest.raises(UserError, match="--offload all needs --zero 3"):
        memory.model_state_bytes(P7, "full", zero=2, gpus=4, offload="all")


# --- activations ----------------------------------------------------------------------------------

def test_activations_follow_korthikanti():
    h, layers, heads, vocab, b, s = 1024, 10, 8, 1000, 2, 512
    full_layer = s * b * h * (34 + 5 * heads * s / h)
    logits = b * s * vocab * 4
    off = memory.activation_bytes(h, layers, heads, vocab, b, s, gradient_checkpointing=False)
    assert off["total"] == pytest.approx(layers * full_layer + logits)
    on = memory.activation_bytes(h, layers, heads, vocab, b, s, gradient_checkpointing=True)
    assert on["total"] == pytest.approx(layers * 2 * s * b * h + full_layer + logits)


def test_estimate_total_sums_the_terms_and_batch_scales_activations():
    spec = memory.resolve_model("7B")
    one = memory.estimate(spec, "full", batch_size=1)
    two = memory.estimate(spec, "full", batch_size=2)
    g = one["per_gpu_bytes"]
    assert g["total"] == sum(v for k, v in g.items() if k != "total")
    assert g["overhead"] == memory.OVERHEAD_BYTES
    assert two["per_gpu_bytes"]["activations"] == pytest.approx(2 * g["activations"], rel=1e-9)
    assert two["per_gpu_bytes"]["weights"] == g["weights"]


# --- the headline answer --------------------------------------------------------------------------

def test_7b_full_does_not_fit_80gb_and_qlora_fits_24gb():
    spec = memory.resolve_model("7B")
    full = memory.estimate(spec, "full", zero=0, gpus=1)
    assert full["fits"] == {"24GB": False, "40GB": False, "80GB": False}
    assert full["per_gpu_bytes"]["weights"] + full["per_gpu_bytes"]["gradients"] + \
        full["per_gpu_bytes"]["optimizer"] == 16 * spec.params.total
    qlora = memory.estimate(spec, "qlora", zero=0, gpus=1)
    assert qlora["fits"] == {"24GB": True, "40GB": True, "80GB": True}
    # ZeRO-3 over 8 GPUs brings the full fine-tune under 24 GB per GPU.
    assert memory.estimate(spec, "full", zero=3, gpus=8)["fits"]["24GB"]


# --- parameter counts -----------------------------------------------------------------------------

def small_llama(**kw):
    from transformers import LlamaConfig

    args = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**(args | kw))


def small_configs():
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    return {
        "llama-gqa-untied": small_llama(),
        "llama-tied": small_llama(tie_word_embeddings=True),
        "llama-biases-head-dim": small_llama(attention_bias=True, mlp_bias=True, head_dim=16),
        "mistral": MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2),
        "qwen2": Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "gpt2 (meta path)": GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                       bos_token_id=0, eos_token_id=0),
    }


def build(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", list(small_configs()))
def test_count_params_is_exact(name):
    config = small_configs()[name]
    model = build(config)
    counts = memory.count_params(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if type(m).__name__ in ("Linear", "Conv1D") and m is not model.get_output_embeddings())
    assert counts.linear == linear


def test_formula_and_meta_device_agree():
    for config in (small_llama(), small_llama(tie_word_embeddings=True, attention_bias=True)):
        assert memory.count_params(config) == memory.count_params_meta(config)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2 (meta path)"])
def test_lora_trainable_count_matches_peft(name):
    import peft

    config = small_configs()[name]
    r = 4
    model = peft.get_peft_model(build(config), peft.LoraConfig(r=r, target_modules="all-linear"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert memory.count_params(config).lora_in_out * r == trainable


def test_shape_table_reproduces_published_parameter_counts():
    published = {"Qwen2.5-0.5B": 494_032_768, "Llama-3.2-1B": 1_235_814_400, "Llama-2-7b": 6_738_415_616,
                 "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496}
    rows = {row.name: row for row in memory.SHAPES}
    for name, n in published.items():
        assert memory.count_params(rows[name].config()).total == n, name


# --- resolving --model ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("7B", 7e9), ("8b", 8e9), ("0.5B", 5e8), ("125M", 1.25e8), ("1T", 1e12),
                                        ("Qwen/Qwen2.5-0.5B", None), ("tiny", None)])
def test_parse_size(text, size):
    assert memory.parse_size(text) == size


def test_size_in_table_uses_its_exact_count_and_between_rows_scales_the_nearest():
    assert memory.resolve_model("8b").params.total == 8_030_261_248
    spec = memory.resolve_model("125M")
    assert spec.params.total == 125_000_000
    assert spec.hidden_size == 576  # SmolLM2-135M, the nearest row
    assert "nearest" in spec.notes[0] and "SmolLM2-135M" in spec.notes[0]
    assert memory.resolve_model("10B").description.startswith("Llama-3.1-8B")  # 1.25x away vs 1.3x to 13B
    with pytest.raises(UserError, match="sizes from"):
        memory.resolve_model("5T")


def test_tiny_matches_the_built_in_model():
    from policies.config import TinyModelConfig
    from policies.tiny import build_model, load_tokenizer

    model = build_model(TinyModelConfig(), load_tokenizer())
    spec = memory.resolve_model("tiny")
    assert spec.params.total == sum(p.numel() for p in model.parameters())
    assert spec.vocab_size == len(load_tokenizer())


def test_local_directory_with_config(tmp_path):
    config = small_llama()
    config.save_pretrained(tmp_path)
    spec = memory.resolve_model(str(tmp_path))
    assert spec.params.total == sum(p.numel() for p in build(config).parameters())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        memory.resolve_model(str(tmp_path / "empty"))


def test_unreachable_hub_id_suggests_a_size():
    # conftest sets HF_HUB_OFFLINE=1: the hub is never contacted.
    with pytest.raises(UserError, match="pass a size like 7B"):
        memory.resolve_model("someone/not-cached-model")


# --- named shapes, shared with `bench speed` -------------------------------------------------------

@pytest.mark.parametrize("name, total", [("llama3-8b", 8_030_261_248), ("Llama-3.1-8B", 8_030_261_248),
                                         ("qwen2.5-0.5b", 494_032_768)])
def test_named_shapes_resolve_without_the_hub(name, total):
    spec = memory.resolve_model(name)
    assert spec.params.total == total and spec.description.endswith(" shape")


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama3-8b"])
def test_bench_speed_builds_the_same_shape(name):
    from rlhf.bench import speed

    config = speed.model_config(speed.BenchSpeedConfig(model=name))
    assert memory.count_params(config) == memory.resolve_model(name).params


def unreachable_hub(monkeypatch):
    """The hub switched on (HF_HUB_OFFLINE off) but answering nowhere: a port where nothing listens."""
    import socket

    import huggingface_hub

    from rlhf.runtime import shapes

    with socket.socket() as s:  # a free port, closed again: connecting to it is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(shapes, "hub_endpoint", lambda: f"http://127.0.0.1:{port}")
    for key in shapes.PROXY_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def test_unreachable_hub_fails_at_once_with_one_line(monkeypatch):
    import time

    unreachable_hub(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"--model 'someone/not-cached-model' is not a named shape \(.*llama3-8b.*\) "
                                        r"or a local directory .* the hub \(http://127.0.0.1:\d+\) cannot be reached: "
                                        r".*; pass a size like 7B instead"):
        memory.resolve_model("someone/not-cached-model")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_from_the_command_line(tmp_path):
    import os
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY",
                                                            "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    def run(model):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rlhf", "estimate-memory", "--model", model],
                              capture_output=True, text=True, timeout=120, env=env)
        return proc, time.perf_counter() - start

    named, named_s = run("llama3-8b")
    assert named.returncode == 0 and "Llama-3.1-8B shape: 8.03e9 parameters" in named.stdout
    bad, bad_s = run("llama3-8b-typo")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "cannot be reached" in bad.stderr
    assert bad_s < named_s + 10  # the libraries' retries took about 25 s more; here one refused connection


def test_a_proxy_decides_reachability_itself(monkeypatch):
    from rlhf.runtime import shapes

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert shapes.unreachable("https://no-such-host.invalid") is None
    monkeypatch.delenv("HTTPS_PROXY")
    for key in shapes.PROXY_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    assert shapes.unreachable("https://no-such-host.invalid", timeout=2) is not None


# --- command line ---------------------------------------------------------------------------------

def test_cli_options_reach_the_estimate(capsys):
    memory.cli(["--model", "7B", "--method", "lora", "--zero", "3", "--gpus", "4", "--batch_size", "2",
                "--seq_len", "1024", "--gradient_checkpointing", "false", "--lora_r", "8", "--offload", "all",
                "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["setup"] == {"method": "lora", "zero": 3, "gpus": 4, "batch_size": 2, "seq_len": 1024,
                               "gradient_checkpointing": False, "lora_r": 8, "offload": "all"}
    assert result["per_gpu_bytes"]["weights"] == 0 and result["cpu_bytes_per_gpu_process"]["weights"] > 0
    assert result["model"]["trainable_parameters"] == 8 * memory.resolve_model("7B").params.lora_in_out


@pytest.mark.parametrize("argv, message", [
    (["--model", "7B", "--zero", "4"], "argument --zero: invalid choice"),
    (["--model", "7B", "--gpus", "0"], "argument --gpus: expected a positive integer"),
    (["--model", "7B", "--gradient_checkpointing", "maybe"], "argument --gradient_checkpointing: expected true"),
    (["--model", "7B", "--lora_r", "8"], "--lora_r applies only to --method lora or qlora"),
    (["--model", "7B", "--batch", "2"], "unrecognized arguments"),
    (["--method", "lora"], "required: --model"),
])
def test_cli_bad_options_name_the_option(argv, message):
    with pytest.raises(UserError, match=message):
        memory.cli(argv)


def rlhf(*args):
    return subprocess.run([sys.executable, "-m", "rlhf", "estimate-memory", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_7b_qlora_and_full_in_a_subprocess():
    qlora = rlhf("--model", "7B", "--method", "qlora", "--zero", "0", "--gpus", "1")
    assert qlora.returncode == 0, qlora.stderr
    out = qlora.stdout
    assert "Llama-2-7b shape: 6.74e9 parameters" in out
    assert "fits in: 24 GB yes, 40 GB yes, 80 GB yes" in out
    assert "NF4" in out and "Dettmers" in out and "GB = 1e9 bytes" in out
    full = rlhf("--model", "7B", "--method", "full")
    assert full.returncode == 0, full.stderr
    assert "weights             13.48 GB" in full.stdout
    assert "optimizer states    80.86 GB" in full.stdout
    assert "fits in: 24 GB no, 40 GB no, 80 GB no" in full.stdout
    assert "why not 80 GB" in full.stdout


def test_cli_bad_method_exits_2_with_one_line():
    bad = rlhf("--model", "7B", "--method", "foo")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert lines == ["rlhf estimate-memory: error: argument --method: invalid choice: 'foo' "
                     "(choose from 'full', 'lora', 'qlora')"]


def test_cli_tiny_json_and_help():
    tiny = rlhf("--model", "tiny", "--method", "lora", "--json")
    assert tiny.returncode == 0, tiny.stderr
    result = json.loads(tiny.stdout)
    assert result["model"]["description"] == "built-in tiny Llama"
    assert result["fits"]["24GB"]
    help_text = rlhf("--help").stdout
    for option in ("--model", "--method", "--zero", "--gpus", "--batch_size", "--seq_len",
                   "--gradient_checkpointing", "--lora_r", "--offload", "--json"):
        assert option in help_text

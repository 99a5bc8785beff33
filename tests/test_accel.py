"""The CUDA fast path (bf16 + CUDA-graph replay + fast decoder) samples the same tokens as the eager
bf16 model with the same seed (GPU only: skipped without CUDA); the bf16 decoder stays close to fp32 (CPU too)."""
import pytest
import torch

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.sampling import sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_graphed_sampling_matches_eager(name):
    from hmar.accel import GraphedModel
    torch.manual_seed(0)
    model = build_model(model_config(name)).cuda().eval().to(torch.bfloat16)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    kw = dict(cfg=2.0, top_k=0, top_p=0, decode=False)
    eager = [sample(model, tok, [1, 2, 3], generator=s, **kw).indices for s in (0, 1)]
    fast = GraphedModel(model)
    for _ in range(2):  # first call captures, second replays
        got = [sample(fast, tok, [1, 2, 3], generator=s, **kw).indices for s in (0, 1)]
        for e, g in zip(eager, got):
            assert all(torch.equal(a, b) for a, b in zip(e, g))
    # another batch size rebuilds the graphs (and VAR's cache buffers)
    a = sample(fast, tok, [4], generator=3, **kw).indices
    b = sample(model, tok, [4], generator=3, **kw).indices
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _check_bf16_decoder(tok, sample(fast, tok, [1, 2, 3], generator=0, decode=False).f_hat)


def _check_bf16_decoder(tok, f_hat):
    """The bf16 channels-last decoder stays close to the fp32 one. Random weights amplify bf16 rounding:
    measured max |diff| 0.15 (CPU) and 0.13-0.22 (H200) on images in [-1, 1], mean 0.010-0.011 (CPU)."""
    from hmar.accel import FastDecoder
    ref = tok.fhat_to_img(f_hat)
    d = (FastDecoder(tok, compile=False).fhat_to_img(f_hat) - ref).abs()
    assert d.mean() < 0.03 and d.max() < 0.5, (d.mean().item(), d.max().item())
    assert d.mean() < 0.1 * ref.abs().mean()


@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_bf16_decoder_close_to_fp32(name):
    torch.manual_seed(0)
    model = build_model(model_config(name)).eval()
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    _check_bf16_decoder(tok, sample(model, tok, [1, 2, 3], generator=0, decode=False).f_hat)


def test_bench_sample_runs_and_keeps_each_variant(tmp_path):
    """The sampling benchmark's CPU smoke path: every variant of every config lands in the JSON with the
    tokens / decode / end-to-end split (the GPU run of it is in BENCHMARKS.md)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_sample.py"), "--device", "cpu", "--configs",
                        "hmar-tiny,var-tiny", "--variants", "fp32-eager,bf16-eager", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"hmar-tiny", "var-tiny"}
    for r in res.values():
        assert set(r) == {"fp32-eager", "bf16-eager"}
        for v in r.values():
            assert v["tokens_ms"] > 0 and v["decode_ms"] > 0 and v["e2e_ms"] > 0


def test_bench_sample_decode_only_compares_decoders_on_the_same_weights(tmp_path):
    """``--decode-only``: every decoder variant decodes the same f_hat with the same weights, so the bf16 one
    differs from fp32 by bf16 rounding only (a variant built with other random weights would differ by ~0.3)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "d.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_sample.py"), "--device", "cpu", "--configs",
                        "hmar-tiny", "--decode-only", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"]["hmar-tiny"]
    assert set(res) == {"fp32-eager", "bf16-eager-cl"}      # the compiled ones need CUDA
    assert res["fp32-eager"]["max_abs_diff_vs_fp32"] == 0 and res["fp32-eager"]["decode_ms"] > 0
    assert 0 < res["bf16-eager-cl"]["mean_abs_diff_vs_fp32"] < 0.03


def test_fast_decoder_without_channels_last_matches_with():
    """``channels_last`` only changes the memory layout: both bf16 decodes stay within bf16 rounding of fp32
    (random weights amplify it: ~0.01 mean on images in [-1, 1], as in ``_check_bf16_decoder``)."""
    import copy

    from hmar.accel import FastDecoder
    torch.manual_seed(0)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    f_hat = torch.randn(2, tok.config.z_channels, 8, 8) * 0.3
    with torch.no_grad():
        ref = tok.fhat_to_img(f_hat)
        cl = FastDecoder(copy.deepcopy(tok), compile=False, channels_last=True)
        plain = FastDecoder(copy.deepcopy(tok), compile=False, channels_last=False)
        for fd in (cl, plain):
            assert (fd.fhat_to_img(f_hat) - ref).abs().mean() < 0.03
    assert plain.dec.conv_in.weight.is_contiguous() and plain.dec.conv_in.weight.dtype == torch.bfloat16
    assert not cl.dec.conv_in.weight.is_contiguous()       # channels_last

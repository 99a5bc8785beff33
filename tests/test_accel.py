"""The CUDA fast path (bf16 + CUDA-graph replay + fast decoder) samples the same tokens as the eager
bf16 model with the same seed (GPU only: skipped without CUDA); the bf16 decoder stays close to fp32 (CPU too)."""
import gc

import pytest
import torch

import hmar.accel
from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.sampling import sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_large_vocabularies_keep_the_torch_draw(monkeypatch):
    """A vocabulary above draw_kernel.MAX_VOCAB keeps the torch draw by default; fused_draw=True still asks for it."""
    from hmar.accel import GraphedModel
    monkeypatch.setattr("hmar.draw_kernel.MAX_VOCAB", 32)   # hmar-tiny's vocabulary is 64
    model = build_model(model_config("hmar-tiny")).cuda().eval().to(torch.bfloat16)
    GraphedModel(model)
    assert not model.fused_draw
    GraphedModel(model, fused_draw=True)
    assert model.fused_draw


@cuda
@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_graphed_sampling_matches_eager(name):
    from hmar.accel import GraphedModel
    torch.manual_seed(0)
    model = build_model(model_config(name)).cuda().eval().to(torch.bfloat16)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    kw = dict(cfg=2.0, top_k=0, top_p=0, decode=False)
    fast = GraphedModel(model, whole_loop=False)       # one graph per pass (the whole loop: the next test)
    assert model.fused_draw      # set on the model: its eager sampling below draws with the same kernel
    eager = [sample(model, tok, [1, 2, 3], generator=s, **kw).indices for s in (0, 1)]
    for _ in range(2):  # first call captures, second replays
        got = [sample(fast, tok, [1, 2, 3], generator=s, **kw).indices for s in (0, 1)]
        for e, g in zip(eager, got):
            assert all(torch.equal(a, b) for a, b in zip(e, g))
    # another batch size rebuilds the graphs (and VAR's cache buffers)
    a = sample(fast, tok, [4], generator=3, **kw).indices
    b = sample(model, tok, [4], generator=3, **kw).indices
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _check_bf16_decoder(tok, sample(fast, tok, [1, 2, 3], generator=0, decode=False).f_hat)


@cuda
@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
@pytest.mark.parametrize("fused_draw", [None, False])
def test_whole_loop_graph_matches_eager(name, fused_draw):
    """The whole token loop as one CUDA graph (``GraphedModel.run_loop``): the exact tokens of the eager bf16 model
    for each seed (default top-k/top-p filters, guidance inside the masked steps on and off), a passed generator
    advanced as eager sampling advances it, and one capture per batch size and options (no fallback); with the
    fused draw (the default, which the model's eager sampling then uses too) and with the torch ops."""
    from hmar.accel import GraphedModel
    torch.manual_seed(0)
    model = build_model(model_config(name)).cuda().eval().to(torch.bfloat16)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    fast = GraphedModel(model, fused_draw=fused_draw)
    assert model.fused_draw == (fused_draw is None)
    for kw in (dict(cfg=2.0), dict(cfg=1.5, guide_masked=True, top_k=50, top_p=0.9)):
        for seed in (0, 1, 0):                            # capture, then replays with another and the same seed
            want = sample(model, tok, [1, 2, 3], generator=seed, decode=False, **kw)
            got = sample(fast, tok, [1, 2, 3], generator=seed, decode=False, **kw)
            same = [torch.equal(a, b) for a, b in zip(want.indices, got.indices)]
            assert all(same), (kw, seed, same)
            torch.testing.assert_close(got.f_hat, want.f_hat)
    assert fast.whole_loop and len(fast._loops) == 2     # one capture per set of options
    g_e, g_f = (torch.Generator("cuda").manual_seed(7) for _ in range(2))
    for _ in range(2):                                    # the second call continues the generator's stream
        a = sample(model, tok, [4, 5], generator=g_e, decode=False).indices
        b = sample(fast, tok, [4, 5], generator=g_f, decode=False).indices
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(g_e.get_state(), g_f.get_state())
    out = [sample(fast, tok, [4, 5], generator=s, decode=False).indices[-1] for s in (0, 1)]
    assert not torch.equal(*out)                          # the replay reads the seed (not one baked in at capture)


@cuda
def test_exponential_draw_is_multinomial_on_cuda():
    """``sample_from_logits`` draws as torch.multinomial draws one sample (argmax p / Exp(1)): the same tokens for
    the same CUDA generator state, so seeds of the synchronising ``multinomial`` carry over."""
    from hmar.sampling import sample_from_logits
    logits = torch.randn(4, 300, 512, device="cuda") * 3
    for seed in range(3):
        tok, _ = sample_from_logits(logits, torch.Generator("cuda").manual_seed(seed))
        ref = torch.multinomial(logits.softmax(-1).reshape(-1, 512), 1,
                                generator=torch.Generator("cuda").manual_seed(seed))
        assert torch.equal(tok.reshape(-1, 1), ref)


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
                        "hmar-tiny,var-tiny", "--variants", "fp32-eager,bf16-eager,fast-percall", "--quick",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"hmar-tiny", "var-tiny"}
    for r in res.values():
        assert set(r) == {"fp32-eager", "bf16-eager", "fast-percall"}
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
    assert set(res) == {"fp32-eager", "bf16-eager-cl", "fp32-eager-chunked", "bf16-eager-cl-chunked",
                        "bf16-eager-cl-subpixel", "bf16-eager-cl-nhwc",
                        "bf16-eager-cl-nhwc-subpixel"}                                       # compiled: CUDA
    assert res["fp32-eager"]["max_abs_diff_vs_fp32"] == 0 and res["fp32-eager"]["decode_ms"] > 0
    assert 0 < res["bf16-eager-cl"]["mean_abs_diff_vs_fp32"] < 0.03
    assert res["bf16-eager-cl"]["chunk"] == 16                   # one call; 64 px images fit one chunk anyway
    assert res["bf16-eager-cl-chunked"]["chunk"] == 16 and res["fp32-eager-chunked"]["chunk"] == 16
    assert res["fp32-eager-chunked"]["max_abs_diff_vs_fp32"] < 1e-4
    assert abs(res["bf16-eager-cl-chunked"]["mean_abs_diff_vs_fp32"] - res["bf16-eager-cl"]["mean_abs_diff_vs_fp32"]) < 1e-3
    # the sub-pixel up-sampling computes the same function: its bf16 decode is as close to fp32 as the plain one
    assert abs(res["bf16-eager-cl-subpixel"]["mean_abs_diff_vs_fp32"] - res["bf16-eager-cl"]["mean_abs_diff_vs_fp32"]) < 2e-3
    # so do the NHWC GroupNorm and up-sampling (their statistics in fp32: no further from fp32 than the plain one)
    assert res["bf16-eager-cl-nhwc"]["mean_abs_diff_vs_fp32"] < res["bf16-eager-cl"]["mean_abs_diff_vs_fp32"] + 2e-3
    assert abs(res["bf16-eager-cl-nhwc-subpixel"]["mean_abs_diff_vs_fp32"]
               - res["bf16-eager-cl-nhwc"]["mean_abs_diff_vs_fp32"]) < 2e-3


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


# --------------------------------------------------------------------------- the fast path's parts, on the CPU
def _nonzero_adaln(model):
    """Random weights everywhere (VAR's init zeroes the AdaLN biases, which would hide a wrong slice)."""
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@torch.no_grad()
def test_precomputed_condition_gives_bitwise_the_same_passes(tiny):
    """Every pass takes the packed AdaLN modulations (computed once per sampling call) in place of the class
    condition and returns exactly the same logits: HMAR's two branches, stage 1, and VAR through its KV cache."""
    hmar, var, nsp, _ = tiny
    g = torch.Generator().manual_seed(0)
    for m in (hmar, var, nsp):
        m = _nonzero_adaln(m)
        cond = m.class_emb(torch.tensor([0, 3, m.num_classes]))
        pre = m.precompute_condition(cond)
        n_blocks = m.config.depth + (m.config.branch_depth if m.config.kind == "hmar" else 0)
        heads = 2 if m.config.kind == "hmar" else 1
        assert pre.shape == (3, 6 * n_blocks + 2 * heads, m.config.embed_dim)
        x = torch.randn(3, 9, m.config.embed_dim, generator=g)
        a, b = m.next_scale_logits(x, cond, m.new_caches()), m.next_scale_logits(x, pre, m.new_caches())
        assert torch.equal(a, b)
        if hasattr(m, "masked_logits"):
            assert torch.equal(m.masked_logits(x, cond), m.masked_logits(x, pre))
        # one block's slice is that block's own modulation (a wrong offset would pick another block's)
        blk = (m.blocks if hasattr(m, "blocks") else m.mask_blocks)[-1]
        assert torch.equal(pre[:, blk.mod_offset:blk.mod_offset + 6], blk.modulation(cond))


def test_sampling_with_precomputed_condition_equals_per_pass_condition(tiny, monkeypatch):
    """The sampler's once-per-call modulations change nothing: same tokens and f_hat as computing them in
    every pass (the precomputation switched off), with guidance inside the masked passes too."""
    hmar, var, _, tok = tiny
    for m in (_nonzero_adaln(hmar), _nonzero_adaln(var)):
        kw = dict(generator=4, cfg=2.0, top_k=0, top_p=0, guide_masked=True, decode=False)
        fast = sample(m, tok, [1, 2, 3], **kw)
        monkeypatch.setattr(type(m), "precompute_condition", lambda self, cond: cond)
        slow = sample(m, tok, [1, 2, 3], **kw)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(fast.indices, slow.indices))
        assert torch.equal(fast.f_hat, slow.f_hat)


def test_decode_chunk_sizes():
    """Images per decoder call: one full-resolution activation within 256 MiB, a divisor of the batch if one is
    near that bound (equal chunks: one compiled shape)."""
    from hmar.presets import PATCH_NUMS
    from hmar.tokenizer import decode_chunk
    c256 = tokenizer_config("vqvae-ch160")
    c512 = tokenizer_config("vqvae-ch160", patch_nums=PATCH_NUMS[512])
    # 160 channels x 256^2 x 2 bytes = 20 MiB per image in bf16 -> at most 12 -> 8 of 16; fp32: 6 -> 4
    assert [decode_chunk(c256, 16, 2), decode_chunk(c256, 16, 4), decode_chunk(c256, 64, 2)] == [8, 4, 8]
    assert [decode_chunk(c512, 16, 2), decode_chunk(c512, 16, 4)] == [2, 1]      # 80 MiB per image in bf16
    assert decode_chunk(c256, 17, 2) == 12 and decode_chunk(c256, 5, 2) == 5 and decode_chunk(c256, 1, 4) == 1
    assert decode_chunk(tokenizer_config("vqvae-tiny"), 256) == 256               # small images: one call


def test_fast_decoder_decodes_16_images_per_call_at_256_and_512_px():
    """FastDecoder's default budget (FAST_DECODE_CHUNK_BYTES, 1.5 GiB of full-resolution activation): 16 images in
    one call at 256 and 512 px (faster on the H200 than 2 x 8 / 8 x 2), 32 at 512 px as 2 x 16 and 20 as 2 x 10
    (equal chunks: one compiled shape); ``max_batch`` wins."""
    from types import SimpleNamespace

    from hmar.accel import FastDecoder
    from hmar.presets import PATCH_NUMS
    for pn, batches in ((PATCH_NUMS[256], {16: 16, 64: 64, 100: 50}), (PATCH_NUMS[512], {16: 16, 32: 16, 20: 10})):
        fd = SimpleNamespace(config=tokenizer_config("vqvae-ch160", patch_nums=pn), dtype=torch.bfloat16, max_batch=None)
        assert {b: FastDecoder.images_per_call(fd, b) for b in batches} == batches
        fd.max_batch = 4
        assert FastDecoder.images_per_call(fd, 16) == 4


@torch.no_grad()
def test_chunked_decode_equals_one_call():
    """Chunks change the result by conv-algorithm rounding only (each image decodes on its own), for the
    tokenizer and for the bf16 FastDecoder."""
    from hmar.accel import FastDecoder
    torch.manual_seed(0)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    f_hat = torch.randn(7, tok.config.z_channels, 8, 8) * 0.3
    whole = tok.fhat_to_img(f_hat, max_batch=7)
    parts = tok.fhat_to_img(f_hat, max_batch=3)
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.fhat_to_img(f_hat[2:3]), whole[2:3], atol=1e-4, rtol=0)
    fd = FastDecoder(tok, compile=False, max_batch=2)
    d = (fd.fhat_to_img(f_hat) - fd.fhat_to_img(f_hat, max_batch=7)).abs()    # bf16 rounding (random weights)
    assert d.mean() < 5e-3 and d.max() < 0.2, (d.mean().item(), d.max().item())
    assert fd.patch_nums == tok.patch_nums and len(fd.img_to_indices(torch.zeros(1, 3, 64, 64))) == len(tok.patch_nums)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_blocks_equal_eager_at_every_scale_with_one_code_for_all_blocks():
    """``compile_blocks`` (inductor, dynamic shapes; what ``GraphedModel(compile=True)`` captures): the eager
    logits to fp32 rounding at every scale size, with one compiled code for all blocks and one for the heads: the
    number of graphs depends neither on the depth nor on the scale size. Each size has a graph for the first block
    of a pass, one for the blocks that add the branch of the block before (``_run(..., defer=True)``) and one for
    the head; dynamo specialises sizes of 1, so the one-token scale gets its own three."""
    from conftest import check_compiled_blocks_graphs
    torch.manual_seed(0)
    check_compiled_blocks_graphs(_nonzero_adaln(build_model(model_config("hmar-tiny", depth=3, branch_depth=1)).eval()))


@pytest.mark.slow
@torch.no_grad()
def test_compiled_blocks_of_var_follow_its_kv_cache_with_a_bounded_number_of_graphs():
    """VAR's blocks compiled: the KV cache's fill level is traced as a symbol, so 7 scales (and a second call)
    need 8 graphs in all (for the 1-token scale and for the others: the first block, the blocks that add the branch
    of the block before, the head; then the two block graphs again for the last scale, where the cache is full);
    logits equal eager to fp32 rounding at every scale."""
    from torch._dynamo.utils import counters

    from hmar.accel import compile_blocks
    torch.manual_seed(0)
    m = _nonzero_adaln(build_model(model_config("var-tiny", patch_nums=(1, 2, 3, 4, 5, 6, 8))).eval())
    pre = m.precompute_condition(m.class_emb(torch.tensor([0, 1, 2])))
    xs = [torch.randn(3, pn * pn, m.config.embed_dim) for pn in m.config.patch_nums]

    def run():
        caches = m.new_caches()
        return [m.next_scale_logits(x, pre, caches) for x in xs]

    want = run()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(m)
    for _ in range(2):
        for got, exp in zip(run(), want):
            torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 8, dict(counters["stats"])


@torch.no_grad()
def test_compiled_blocks_of_many_models_in_one_process_all_stay_compiled():
    """Every model width is an entry of the blocks' one compiled code (and so is the one-token scale): with dynamo's
    default recompile limit (8) the blocks of the fifth width here ran eagerly, with a warning only (on the H200
    that made hmar-d16 1.34x slower after two hmar-d30 variants). ``compile_blocks`` raises the limit, so six
    models of different widths, each at the sampler's kinds of passes, all get compiled frames of their own."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from hmar.accel import COMPILE_RECOMPILE_LIMIT, compile_blocks
    from hmar.model.blocks import AdaLNBlock, AdaLNHead
    torch._dynamo.reset()
    counter = CompileCounter()   # a backend that counts the frames it is handed and runs them as traced
    new_frames = []
    try:
        for width in (32, 48, 64, 80, 96, 112):
            blocks = compile_blocks(torch.nn.ModuleList([AdaLNBlock(width, 2), AdaLNHead(width)]).eval(),
                                    backend=counter)
            before = counter.frame_count
            for B, n in ((2, 1), (4, 4), (2, 9)):
                x = torch.randn(B, n, width)
                blocks[1](blocks[0](x, torch.randn(B, 6, width), (n,), "dense"), torch.randn(B, 2, width))
            new_frames.append(counter.frame_count - before)
    finally:
        torch._dynamo.reset()
    assert new_frames == [4] * 6, new_frames          # block and head, each for n = 1 and for the other sizes
    assert torch._dynamo.config.recompile_limit >= COMPILE_RECOMPILE_LIMIT


def test_fast_sampling_needs_cuda(tmp_path, capsys):
    """``--fast`` / ``enable_fast_sampling`` on a CPU machine: one clear error before any model is loaded."""
    from hmar.cli import main
    from hmar.errors import HMARError
    from hmar.pipeline import HMARPipeline
    with pytest.raises(HMARError, match="CUDA"):
        HMARPipeline.from_preset("hmar-tiny").enable_fast_sampling()
    for flag in ("--fast", "--compile"):
        assert main(["sample", flag, "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
        assert "use --device cuda" in capsys.readouterr().err
    for args in (["--decode-batch", "4"], ["--decode-batch", "0", "--fast"],   # need --fast, and >= 1
                 ["--full-res-chunks", "2"], ["--full-res-chunks", "0", "--fast"]):
        assert main(["sample", *args, "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
        assert args[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_pipeline_fast_sampling_matches_eager_bf16_and_still_edits(compile, tmp_path):
    """``enable_fast_sampling`` on the GPU. Graphed eager passes: exactly the tokens of the eager bf16 model for
    the same seed. Compiled blocks round to bf16 once per fused kernel instead of once per op, so their logits
    match eager bf16 to bf16 rounding (and sampled tokens may then differ); replays are deterministic either way.
    Both: images within bf16 decoder rounding, editing through the fast tokenizer, a clear refusal to save."""
    import numpy as np

    from hmar.errors import HMARError
    from hmar.pipeline import HMARPipeline
    from hmar.model.blocks import FFN
    ref = HMARPipeline.from_preset("hmar-tiny", device="cuda")
    ref.model.to(torch.bfloat16)
    for mod in ref.model.modules():      # as GraphedModel sets on its model by default (the eager passes it replays)
        if isinstance(mod, FFN):
            mod.fused_gelu = True
    ref.model.fused_draw = True          # ... and the draw
    want = ref.generate([1, 2, 3], generator=0)
    pipe = HMARPipeline.from_preset("hmar-tiny", device="cuda").enable_fast_sampling(
        compile=compile, decode_batch=2 if compile else None, full_res_chunks=2 if compile else None)
    assert pipe.tokenizer.max_batch == (2 if compile else None)      # 3 images decode as 2 + 1 with compile
    assert pipe.tokenizer.full_res_chunks == (2 if compile else None)    # ... and each call's last part as 1 + 1
    runs = [pipe.generate([1, 2, 3], generator=0) for _ in range(2)]      # capture (and compile), then replay
    assert all(torch.equal(a, b) for a, b in zip(runs[0].indices, runs[1].indices))
    if not compile:
        assert all(torch.equal(a, b) for a, b in zip(want.indices, runs[1].indices))
        assert (runs[1].images - want.images).abs().mean() < 0.03
    m = ref.model
    pre = m.precompute_condition(m.class_emb(torch.tensor([1, 2, 3], device="cuda")))
    x = torch.randn(3, 9, m.config.embed_dim, device="cuda", dtype=torch.bfloat16)
    for fn in ("next_scale_logits", "masked_logits"):
        got, exp = getattr(pipe.model, fn)(x, pre), getattr(m, fn)(x, pre)
        torch.testing.assert_close(got, exp, atol=3e-2, rtol=3e-2)
        if not compile:
            assert torch.equal(got, exp)
    img = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    assert len(pipe.inpaint(img, mask, seeds=[0])) == 1
    # the encoder waits on the host (sampling never uses it) and encodes on the GPU exactly as before
    assert pipe.tokenizer.tokenizer.encoder.conv_in.weight.device.type == "cpu"
    x = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1
    got, exp = pipe.tokenizer.img_to_indices(x), ref.tokenizer.img_to_indices(x)   # fp32 both (cuDNN may differ)
    assert [g.shape for g in got] == [e.shape for e in exp]
    assert torch.cat([g == e for g, e in zip(got, exp)], 1).float().mean() > 0.99
    assert pipe.tokenizer.tokenizer.encoder.conv_in.weight.device.type == "cpu"
    with pytest.raises(HMARError, match="low precision"):
        pipe.save_pretrained(tmp_path / "m")


def test_run_loop_plumbing_on_the_cpu(monkeypatch):
    """``GraphedModel.run_loop``'s bookkeeping without a GPU: CUDA graphs are replaced by a stand-in whose replay
    re-runs the captured loop with the graph's own generator. Checked: the user's generator state goes in before a
    replay and comes back after it (same tokens as eager for each seed, and a passed generator continues as eager
    sampling continues it), one capture per batch size and options, outputs cloned (a replay does not overwrite
    what an earlier call returned). On the GPU, test_whole_loop_graph_matches_eager checks the real graphs."""
    import contextlib
    from collections import OrderedDict

    import hmar.accel as accel

    class Graph:
        def register_generator_state(self, g):
            self.gen = g

        def replay(self):
            idx, f_hat, _, bad = self.run()
            for a, b in zip(self.outs[0], idx):
                a.copy_(b)
            self.outs[1].copy_(f_hat)
            self.outs[3].copy_(bad)

    class Stream:
        def wait_stream(self, s):
            pass

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(hmar.accel, "_capture_stream", Stream)
    for name in ("hmar-tiny", "var-tiny"):
        torch.manual_seed(0)
        model = build_model(model_config(name)).eval()
        tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
        monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cpu")))
        fast = object.__new__(accel.GraphedModel)       # __init__ refuses a CPU model
        fast.__dict__.update(model=model, warmup=1, whole_loop=True, max_loops=3, _graphs={}, _loops=OrderedDict(),
                             _caches=None, pool=None, _loop_pool=None, reserve_pool=False)
        capture = fast._capture_loop

        def capture_and_remember(loop, y, gen, capture=capture):
            graph, sy, sgen, outs = capture(loop, y, gen)
            graph.run, graph.outs = (lambda: loop(model, sy, sgen)), outs
            assert graph.gen is sgen
            return graph, sy, sgen, outs

        fast._capture_loop = capture_and_remember
        first = None
        for seed in (0, 1, 0):
            want = sample(model, tok, [1, 2, 3], generator=seed, decode=False)
            got = sample(fast, tok, [1, 2, 3], generator=seed, decode=False)
            assert all(torch.equal(a, b) for a, b in zip(want.indices, got.indices)) and got.passes == want.passes
            first = first or got
        assert all(torch.equal(a, b) for a, b in zip(first.indices, want.indices))   # not overwritten by replays
        g_e, g_f = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(2):
            a = sample(model, tok, [1, 2], generator=g_e, decode=False).indices
            b = sample(fast, tok, [1, 2], generator=g_f, decode=False).indices
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert torch.equal(g_e.get_state(), g_f.get_state())
        assert len(fast._loops) == 2                        # batch 3 and batch 2, the same options
        sample(fast, tok, [1, 2], generator=0, decode=False, cfg=3.0)
        assert len(fast._loops) == 3
        sample(fast, tok, [1, 2, 3], generator=0, decode=False)             # used again: now the most recent
        sample(fast, tok, [1, 2], generator=0, decode=False, cfg=4.0)       # a fourth: the oldest (batch 2) goes
        assert len(fast._loops) == 3 and [k[0][0] for k in fast._loops] == [2, 3, 2]
        assert [dict(k[1][1:])["cfg"] for k in fast._loops] == [3.0, 1.5, 4.0]


@cuda
def test_graphed_model_is_freed_without_the_cyclic_gc():
    """Dropping the last reference to a GraphedModel frees its weights and graphs at once (no reference cycle:
    the benchmark's per-variant memory figures rely on it), and a VAR model has no masked pass through it."""
    import gc
    import weakref

    from hmar.accel import GraphedModel
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    for name in ("hmar-tiny", "var-tiny"):
        fast = GraphedModel(build_model(model_config(name)).cuda().eval().to(torch.bfloat16))
        assert hasattr(fast, "masked_logits") == name.startswith("hmar")
        sample(fast, tok, [1, 2], generator=0, decode=False)
        gc.disable()
        try:
            ref = weakref.ref(fast)
            del fast
            assert ref() is None
        finally:
            gc.enable()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_fused_gelu_ffn_matches_the_plain_one(device):
    """``FFN.fused_gelu`` (fc1's bias + GELU in the GEMM epilogue, CUDA only): the same function as
    fc1 -> GELU(tanh) -> fc2 without autograd (fp32: to float rounding, which also tells the tanh GELU from the exact
    one, 2e-4 apart here; bf16: within bf16 rounding, the epilogue works on the fp32 accumulator). With autograd
    (training), and on the CPU (where ``_addmm_activation`` computes the exact GELU), it is the plain path, bitwise."""
    from hmar.model.blocks import FFN
    torch.manual_seed(0)
    ffn = FFN(64, 256).to(device)
    x = torch.randn(3, 7, 64, device=device)
    want = ffn(x)
    ffn.fused_gelu = True
    assert torch.equal(ffn(x), want)                                  # grad enabled: the plain path
    with torch.no_grad():
        got = ffn(x)
        if device == "cpu":
            assert torch.equal(got, want)
            return
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        xb, fb = x.bfloat16(), ffn.bfloat16()
        got = fb(xb)
        fb.fused_gelu = False
        torch.testing.assert_close(got.float(), fb(xb).float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subpixel_upsample_is_nearest_x2_then_conv(dtype):
    """``Upsample.fuse_subpixel``: one 2x2 conv on the low-resolution input, its four output phases interleaved, is
    nearest x2 + the 3x3 conv (float64: to 1e-12; fp32, channels_last: to float rounding), odd sizes included; the
    state dict keeps the official keys; a whole decoder with it decodes the same images (FastDecoder(subpixel=True))."""
    import copy

    from hmar.accel import FastDecoder
    from hmar.tokenizer.autoencoder import Upsample
    torch.manual_seed(0)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    for c, h, w in ((6, 5, 7), (32, 4, 4)):
        up = Upsample(c).to(dtype)
        x = torch.randn(2, c, h, w, dtype=dtype)
        want = up(x)
        up.fuse_subpixel()
        assert list(up.state_dict()) == ["conv.weight", "conv.bias"]
        torch.testing.assert_close(up(x), want, **tol)
        up.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        for nhwc in (False, True):   # the NCHW interleave, and the NHWC one that writes a channels_last output
            up.nhwc = nhwc
            got = up(xc)
            torch.testing.assert_close(got, want, **tol)
            assert got.is_contiguous(memory_format=torch.channels_last) == nhwc
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    f_hat = torch.randn(2, tok.config.z_channels, 8, 8) * 0.3
    with torch.no_grad():
        ref = tok.fhat_to_img(f_hat)
        for nhwc in (False, True):
            got = FastDecoder(copy.deepcopy(tok), dtype=torch.float32, compile=False, subpixel=True,
                              nhwc_kernels=nhwc).fhat_to_img(f_hat)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_full_res_chunks_decode_the_same_images():
    """``Decoder.forward`` is ``full_res(low_res(z))``, also for a decoder of a single level (no up-sampling), and
    ``FastDecoder(full_res_chunks=N)`` runs the full-resolution part on N chunks of each call's images (the sizes of
    ``split``), giving the same images, also for chunk counts that do not divide the batch or exceed it (oneDNN may
    pick another algorithm per batch size: not bit for bit); 0 is refused. By default (``None``) the chunks keep
    one full-resolution activation within ``FAST_FULL_RES_BYTES``: with the official tokenizer in bf16, a call of 16
    images runs that part whole at 256 px and in 2 chunks at 512 px (4 for 32 images, 3 for 24)."""
    import copy
    from types import SimpleNamespace

    from hmar.accel import FastDecoder
    from hmar.tokenizer.autoencoder import Decoder
    torch.manual_seed(0)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    f_hat = torch.randn(5, tok.config.z_channels, 8, 8) * 0.3
    one = Decoder(ch=8, ch_mult=(2,), num_res_blocks=1, z_channels=tok.config.z_channels, groups=4).eval()
    with torch.no_grad():
        for dec in (tok.decoder, one):
            assert torch.equal(dec(f_hat), dec.full_res(dec.low_res(f_hat)))
        assert FastDecoder(copy.deepcopy(tok), compile=False).full_res_images(16) == 16
        for chunks in (1, 2, 3, 5, 9):
            fast = FastDecoder(copy.deepcopy(tok), dtype=torch.float32, compile=False, full_res_chunks=chunks)
            calls = []
            fast.dec.up[0].block[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
            got = fast.fhat_to_img(f_hat)
            if chunks == 1:     # (the NHWC forms and the sub-pixel convs round apart from the plain decoder)
                torch.testing.assert_close(got, tok.fhat_to_img(f_hat), atol=1e-4, rtol=1e-4)
                want = got
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert calls == [len(c) for c in torch.arange(5).split(-(-5 // chunks))], (chunks, calls)
    with pytest.raises(ValueError, match="full_res_chunks"):
        FastDecoder(copy.deepcopy(tok), compile=False, full_res_chunks=0)
    fast._decode_graphs[(5, 8, 8, 8)], fast._needs[(5, 8, 8, 8)] = "a captured graph", 1
    fast.full_res_chunks = 2                           # graphs captured with other chunks would replay those
    assert not fast._decode_graphs and not fast._needs and fast.full_res_images(5) == 3
    for name, images, per_chunk in (("vqvae-ch160", 16, 16), ("vqvae-ch160", 32, 32), ("vqvae-ch160-512", 16, 8),
                                    ("vqvae-ch160-512", 32, 8), ("vqvae-ch160-512", 24, 8), ("vqvae-ch160-512", 1, 1)):
        fake = SimpleNamespace(full_res_chunks=None, config=tokenizer_config(name), dtype=torch.bfloat16)
        assert FastDecoder.full_res_images(fake, images) == per_chunk, (name, images)


def test_nhwc_kernels_compute_the_same_decoder():
    """``FastDecoder(nhwc_kernels=True)``: the GroupNorm from per-channel statistics equals ``nn.GroupNorm``
    (float64 to 1e-12, also with a large common offset, where a sum-of-squares variance would lose digits; channels_last
    and contiguous inputs; groups of 1 and of several channels), the NHWC up-sampling is nearest x2 exactly, the state
    dict keeps the official keys, and a whole decoder with both decodes the images of the plain one; the flags stay
    off without channels_last."""
    import copy

    import torch.nn.functional as F

    from hmar.accel import FastDecoder
    from hmar.tokenizer.autoencoder import GroupNorm, Upsample, group_norm_from_channel_stats
    torch.manual_seed(0)
    for c, g, h, w in ((32, 32, 3, 5), (64, 8, 6, 4), (160, 32, 7, 7)):
        x = torch.randn(2, c, h, w, dtype=torch.float64) * 3 + 1e4 * torch.rand(1, c, 1, 1, dtype=torch.float64)
        wgt, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        want = F.group_norm(x, g, wgt, b, 1e-6)
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            got = group_norm_from_channel_stats(xin, g, wgt, b, 1e-6)
            assert got.dtype == x.dtype
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        norm = GroupNorm(g, c, eps=1e-6).double()
        norm.channel_stats = True
        torch.testing.assert_close(norm(x), F.group_norm(x, g, norm.weight, norm.bias, 1e-6), atol=1e-9, rtol=1e-9)
        assert list(norm.state_dict()) == ["weight", "bias"]
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    want = up(x)
    up.nhwc = True
    assert torch.equal(up(x), want)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    f_hat = torch.randn(2, tok.config.z_channels, 8, 8) * 0.3
    with torch.no_grad():
        ref = tok.fhat_to_img(f_hat)
        fast = FastDecoder(copy.deepcopy(tok), dtype=torch.float32, compile=False, nhwc_kernels=True)
        assert fast.nhwc_kernels and all(m.channel_stats for m in fast.dec.modules() if isinstance(m, GroupNorm))
        assert all(m.nhwc for m in fast.dec.modules() if isinstance(m, Upsample))
        torch.testing.assert_close(fast.fhat_to_img(f_hat), ref, atol=1e-4, rtol=1e-4)
    plain = FastDecoder(copy.deepcopy(tok), dtype=torch.float32, compile=False, channels_last=False, nhwc_kernels=True)
    assert not plain.nhwc_kernels and not any(m.channel_stats for m in plain.dec.modules() if isinstance(m, GroupNorm))


def test_decoder_graph_plumbing_on_the_cpu(monkeypatch):
    """``FastDecoder(graphs=True)``'s bookkeeping without a GPU (CUDA graphs replaced by a stand-in whose replay
    re-runs the captured call on the graph's static input): the images of eager decoding, one capture per input
    shape (3 images as 2 + 1: two graphs), replays' outputs cloned (a later replay does not overwrite what an earlier
    call returned), and a capture that fails falls back to eager decoding with a warning."""
    import contextlib

    from hmar.accel import FastDecoder
    from hmar.tokenizer import decode_in_chunks

    capturing = {}

    class Graph:
        def replay(self):
            self.run()

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        capturing["g"] = g
        try:
            yield
        finally:                                      # as torch.cuda.graph ends a capture that raised
            capturing.pop("g")

    class Stream:
        def wait_stream(self, s):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(hmar.accel, "_capture_stream", Stream)
    torch.manual_seed(0)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    fd = FastDecoder(tok, dtype=torch.float32, compile=False, max_batch=2)
    real = fd._decode

    def decode(x):
        out = real(x)
        if "g" in capturing:                          # the call being captured: its replay recomputes it
            capturing["g"].run = lambda: out.copy_(real(x))
        return out

    fd._decode, fd.graphs, fd.pool, fd.reserve_pool = decode, True, None, False   # reserving: its own test below
    f_a, f_b = (tok.indices_to_fhat([torch.randint(0, tok.config.vocab_size, (3, p * p)) for p in tok.patch_nums])
                for _ in range(2))
    with torch.no_grad():
        want_a, want_b = (decode_in_chunks(fd._decode_eager, f, 2) for f in (f_a, f_b))   # the same 2 + 1 calls
        got_a = fd.fhat_to_img(f_a)                   # captures (2, ...) and (1, ...)
        got_b = fd.fhat_to_img(f_b)                   # replays both
    assert sorted(k[0] for k in fd._decode_graphs) == [1, 2]
    assert torch.equal(got_b, want_b) and torch.equal(got_a, want_a)   # got_a not overwritten by f_b's replays
    assert not torch.equal(got_a, got_b)
    fd.max_batch = 3                                  # one call: what it returns must not be the graph's own buffer
    with torch.no_grad():
        one_a, one_b = fd.fhat_to_img(f_a), fd.fhat_to_img(f_b)
        torch.testing.assert_close(one_a, fd._decode_eager(f_a))     # (oneDNN may round a fresh buffer otherwise)
        torch.testing.assert_close(one_b, fd._decode_eager(f_b))
    assert len(fd._decode_graphs) == 3

    def broken(x):
        if "g" in capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(x)

    fd._decode, fd._decode_graphs, fd.max_batch = broken, {}, 2
    with pytest.warns(UserWarning, match="could not be captured"), torch.no_grad():
        assert torch.equal(fd.fhat_to_img(f_a), want_a)
    assert fd.graphs is False


@cuda
def test_one_pool_block_serves_the_loop_and_the_decoder():
    """``accelerate()`` on the GPU: the loop's first capture warms the decoder up (``pool_guest``) and reserves one
    block for the larger of the two needs; the decoder's graphs then fit in that block, so the shared pool holds
    about that block, not the sum of both needs (a few 2 MB segments of small allocations aside). The images are
    those of the pipeline without the shared reservation."""
    from hmar.accel import accelerate
    from hmar.pipeline import HMARPipeline
    images = {}
    for guest in (True, False):
        pipe = accelerate(HMARPipeline.from_preset("hmar-tiny", device="cuda"), decode_batch=16)
        assert pipe.model.pool_guest is pipe.tokenizer
        if not guest:
            pipe.model.pool_guest = None
        images[guest] = pipe.generate([i % 10 for i in range(16)], generator=0).images
        (graph, *_), = pipe.model._loops.values()
        (dec, *_), = pipe.tokenizer._decode_graphs.values()
        pool = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pipe.model._loop_pool))
        assert dec.reserved > 8 * 2 ** 20                  # large enough to tell one block from two
        if guest:
            assert graph.reserved >= dec.reserved
            assert pool <= graph.reserved + 8 * 2 ** 20, (pool, graph.reserved, dec.reserved)
        elif dec.reserved > graph.reserved:               # the decoder's block did not fit in the loop's
            assert pool >= graph.reserved + dec.reserved, (pool, graph.reserved, dec.reserved)
        del pipe, graph, dec
        gc.collect()
        torch.cuda.empty_cache()
    torch.testing.assert_close(images[True], images[False], atol=1e-3, rtol=0)


@cuda
def test_graphed_decoder_in_the_loop_pool_matches_the_plain_one():
    """``accelerate(graph_decoder=True)`` (the default) on the GPU: the decoder's calls replay CUDA graphs in the
    loop graph's pool. Images equal those of the same decoder without graphs (the same kernels), over calls with two seeds and
    two batch sizes (whose returns stay intact), and the tokens are those of the pipeline without decoder graphs;
    the same with the pools reserved at the warm-up's peak (``reserve_pool``)."""
    from hmar.accel import accelerate
    from hmar.pipeline import HMARPipeline
    runs = {}
    for graphed, reserve in ((False, False), (True, False), (True, True)):
        pipe = HMARPipeline.from_preset("hmar-tiny", device="cuda")
        accelerate(pipe, decode_batch=2, graph_decoder=graphed, reserve_pool=reserve)
        assert pipe.model.reserve_pool is reserve and pipe.tokenizer.reserve_pool is reserve
        assert pipe.tokenizer.graphs is graphed and (not graphed or pipe.tokenizer.pool is pipe.model._loop_pool)
        runs[graphed, reserve] = [pipe.generate(lab, generator=s)
                                  for lab, s in (([1, 2, 3], 0), ([4, 5], 1), ([1, 2, 3], 2))]
        assert pipe.tokenizer.graphs is graphed and pipe.model.whole_loop     # no fallback
    default = accelerate(HMARPipeline.from_preset("hmar-tiny", device="cuda"))   # what --fast gets: both on
    assert default.tokenizer.graphs and default.model.reserve_pool and default.tokenizer.reserve_pool
    for key in ((True, False), (True, True)):
        for a, b in zip(runs[False, False], runs[key]):
            assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
            torch.testing.assert_close(b.images, a.images, atol=1e-3, rtol=0)


def test_fused_qk_norm_default_needs_triton(monkeypatch):
    """``GraphedModel``'s default for the q/k normalisation inside the attention kernel: on wherever the Triton
    backend is importable, in the passes of at most ``FUSED_QK_NORM_MAX_TOKENS`` (256) tokens, where the H200
    measured it faster at 16 and 30 heads."""
    import hmar.accel as acc
    import hmar.attention as A
    assert acc.FUSED_QK_NORM_MAX_TOKENS == 256
    monkeypatch.setattr(A, "_maybe_load_triton", lambda: None)
    monkeypatch.setattr(A, "_QK_NORM_BACKENDS", {"triton": object()})
    assert acc.fuse_qk_norm_by_default()
    monkeypatch.setattr(A, "_QK_NORM_BACKENDS", {})         # no Triton: never
    assert not acc.fuse_qk_norm_by_default()


def test_graphed_model_refuses_a_negative_token_limit():
    from hmar.accel import GraphedModel
    with pytest.raises(ValueError, match="fused_qk_norm_max_tokens=-5; use a number of tokens >= 0"):
        GraphedModel(build_model(model_config("hmar-tiny")), fused_qk_norm_max_tokens=-5)


def test_fused_qk_norm_token_limit_keeps_long_passes_unfused(monkeypatch):
    """``SelfAttention.fused_qk_norm_max_tokens``: with the fused normalisation on, a pass over more tokens than the
    limit asks the attention for the normalisation as ops, a pass within it for the fused one; without the fused
    normalisation the limit changes nothing. The outputs are the model's numerics either way."""
    import hmar.model.blocks as blocks
    calls = []
    real = blocks.packed_attention

    def spy(*args, **kw):
        calls.append(kw["fuse_qk_norm"])
        return real(*args, **{**kw, "fuse_qk_norm": False})

    monkeypatch.setattr(blocks, "packed_attention", spy)
    layer = blocks.SelfAttention(32, 4)
    x = torch.randn(2, 9, 32)
    ref = layer(x, (1, 4, 4), "block_diagonal")
    for fuse, most, want in ((True, 8, False), (True, 9, True), (True, None, True), (False, 4, False),
                             (None, 4, None)):
        layer.fused_qk_norm, layer.fused_qk_norm_max_tokens = fuse, most
        calls.clear()
        torch.testing.assert_close(layer(x, (1, 4, 4), "block_diagonal"), ref)
        assert calls == [want], (fuse, most, calls)


@cuda
def test_graphed_model_sets_the_fused_qk_norm_of_its_layers(monkeypatch):
    """``GraphedModel(fused_qk_norm=)`` reaches every attention layer (None: ``fuse_qk_norm_by_default()``), the fused
    loop goes through the kernels' normalisation, and its tokens are those of the unfused loop up to ties of the
    bf16 logits (head dim 64: the fused kernel's)."""
    import hmar.attention as A
    from hmar.accel import GraphedModel, fuse_qk_norm_by_default
    from hmar.model.blocks import SelfAttention
    tok = VQVAE(tokenizer_config("vqvae-tiny")).cuda().eval()
    calls = []
    A._maybe_load_triton()
    for table in (A._QK_NORM_BACKENDS, A._PACKED_BACKENDS):   # (the layers call the packed form)
        monkeypatch.setitem(table, "triton", lambda *a, _fn=table["triton"]: (calls.append(1), _fn(*a))[1])
    runs = {}
    for fuse in (None, False, True):
        torch.manual_seed(0)
        model = build_model(model_config("hmar-tiny", embed_dim=128, num_heads=2)).cuda().to(torch.bfloat16).eval()
        g = GraphedModel(model, fused_qk_norm=fuse)
        want = fuse_qk_norm_by_default() if fuse is None else fuse
        layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
        assert layers and all(m.fused_qk_norm is want for m in layers) and g.fused_qk_norm is want
        n = len(calls)
        runs[fuse] = sample(g, tok, [1, 2, 3, 4], generator=0, decode=False).indices
        assert (len(calls) > n) is want
        n_fused = len(calls) - n
    assert fuse_qk_norm_by_default() and all(torch.equal(a, b) for a, b in zip(runs[None], runs[True]))
    # a token limit: the passes over more tokens go unfused, the shorter ones through the kernels (fewer calls)
    torch.manual_seed(0)
    model = build_model(model_config("hmar-tiny", embed_dim=128, num_heads=2)).cuda().to(torch.bfloat16).eval()
    g = GraphedModel(model, fused_qk_norm=True, fused_qk_norm_max_tokens=4)
    assert all(m.fused_qk_norm_max_tokens == 4 for m in model.modules() if isinstance(m, SelfAttention))
    n = len(calls)
    limited = sample(g, tok, [1, 2, 3, 4], generator=0, decode=False).indices
    assert 0 < len(calls) - n < n_fused, (len(calls) - n, n_fused)
    assert min(torch.eq(a, b).float().mean().item() for a, b in zip(runs[False], limited)) > 0.5
    same = [torch.eq(a, b).float().mean().item() for a, b in zip(runs[False], runs[True])]
    assert min(same) > 0.5, same


def test_reserved_pool_plumbing_on_the_cpu(monkeypatch):
    """``reserve_pool`` without a GPU (memory statistics and CUDA graphs replaced by stand-ins): the peak of a second
    warm-up run above what was allocated before is measured (the first run's compiling and autotuning workspaces do
    not count), and each capture (the loop's and the decoder's) reserves exactly that as its first allocation,
    inside the graph; without ``reserve_pool`` nothing is measured, and the reservation is of 0 bytes (no
    allocation). A decoder sharing the loop's pool (``pool_guest``) is warmed up by the loop's first capture, which
    reserves the larger need plus the slack; the decoder's captures then skip their warm-ups."""
    import contextlib

    import hmar.accel as accel
    from hmar.accel import FastDecoder, GraphedModel

    stats = {"alloc": 1000, "peak": 1000}
    events = []

    class Graph:
        def register_generator_state(self, g):
            pass

        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        assert stream is accel._capture_stream()     # the warm-ups' stream (its cuBLAS workspace is outside the pool)
        events.append("begin")
        yield
        events.append("end")

    class Stream:
        def wait_stream(self, s):
            pass

    for name, fn in (("synchronize", lambda: None), ("memory_allocated", lambda: stats["alloc"]),
                     ("reset_peak_memory_stats", lambda: stats.update(peak=stats["alloc"])),
                     ("max_memory_allocated", lambda: stats["peak"]), ("Stream", Stream), ("current_stream", Stream),
                     ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", Graph), ("graph", graph),
                     ("current_device", lambda: 0)):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(accel, "_CAPTURE_STREAMS", {})
    real_reserve = accel._reserve
    monkeypatch.setattr(accel, "_reserve", lambda n, d: (events.append(("reserve", n)), real_reserve(n, d)))

    def work(held):                                   # what a warm-up or a captured call does to the statistics
        stats["peak"] = max(stats["peak"], stats["alloc"] + held)
        events.append("run")

    held = iter([9000, 3000])                         # the first run compiles and autotunes, the second is steady
    assert accel._on_side_stream(lambda: work(next(held)), measure=True) == 3000
    monkeypatch.setattr(accel, "MEASURE_SECOND_WARMUP", False)
    assert accel._on_side_stream(lambda: work(5000), measure=True) == 5000
    monkeypatch.setattr(accel, "MEASURE_SECOND_WARMUP", True)
    assert accel._on_side_stream(lambda: work(7000)) == 0          # not measured: the statistics are not touched

    def graphed(reserve, guest=None):
        fast = object.__new__(GraphedModel)
        fast.__dict__.update(model=None, warmup=1, reserve_pool=reserve, _loop_pool=None, pool_guest=guest,
                             _loops={})
        return fast
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    for reserve in (True, False):
        warm = ["run", "run"] if reserve else ["run"]
        events.clear()
        graphed(reserve)._capture_loop(lambda m, y, g: work(3000), torch.zeros(2), torch.Generator())
        assert events == warm + ["begin", ("reserve", 3000 if reserve else 0), "run", "end"]   # 0: nothing
        events.clear()
        fd = FastDecoder(tok, dtype=torch.float32, compile=False)
        fd._decode, fd.graphs, fd.pool, fd.reserve_pool = (lambda x: (work(4000), x)[1]), True, None, reserve
        fd.fhat_to_img(torch.zeros(1, 2))
        assert events == warm + ["begin", ("reserve", 4000 if reserve else 0), "run", "end", "replay"]

    fd = FastDecoder(tok, dtype=torch.float32, compile=False, max_batch=2)
    fd._decode, fd.graphs, fd.pool = (lambda x: (work(4000 * x.shape[0]), x)[1]), True, None
    events.clear()                                    # a batch of 3: decoder calls of 2 and 1 images
    graphed(True, guest=fd)._capture_loop(lambda m, y, g: work(3000), torch.zeros(3), torch.Generator())
    block = int(8000 * (1 + accel.POOL_SLACK))
    assert events == ["run"] * 2 + ["run"] * 4 + ["begin", ("reserve", block), "run", "end"]
    side = tok.patch_nums[-1]
    events.clear()
    fd.fhat_to_img(torch.zeros(3, tok.config.z_channels, side, side))    # no warm-up: measured by prepare
    assert events == ["begin", ("reserve", 8000), "run", "end", "replay",
                      "begin", ("reserve", 4000), "run", "end", "replay"]
    events.clear()                                    # a later loop capture in that pool reserves its own need
    fast = graphed(True, guest=fd)
    fast._loops["an earlier loop"] = None
    fast._capture_loop(lambda m, y, g: work(3000), torch.zeros(3), torch.Generator())
    assert events == ["run"] * 2 + ["begin", ("reserve", 3000), "run", "end"]


def _bench_sample_module(monkeypatch):
    """``benchmarks/bench_sample.py`` imported as a module (its helpers sit beside it, on the path)."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_sample", root / "benchmarks" / "bench_sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_sample_prints_the_goal_table(capsys, monkeypatch):
    """``bench_sample.print_ratios`` on the figures of 2026-12-02's call 4 (hmar-d16): side-by-side ratios against
    the first variant, and each variant against the official sampler's reference figures and the issue's goals."""
    bench = _bench_sample_module(monkeypatch)
    old = dict(tokens_ms=36.9, decode_ms=37.4, e2e_ms=69.14, peak_gb=1.95, pools_gb=1.07)
    new = dict(tokens_ms=32.6, decode_ms=29.4, e2e_ms=55.53, peak_gb=2.58, pools_gb=0.76)
    bench.print_ratios({"hmar-d16": {"old": old, "new": new}})
    out = capsys.readouterr().out
    assert "new                        vs old: tokens 1.13x  decode 1.27x  e2e 1.25x" in out
    assert "old                        e2e 2.73x (NOT met)" in out and "peak 0.32 (met), with pools 0.50 (met)" in out
    assert "new                        e2e 3.40x (met)  tokens 32.6 / 30 ms (NOT met)" in out
    assert "peak 0.42 (met), with pools 0.55 (NOT met)" in out


def test_bench_sample_variant_options(monkeypatch):
    """``bench_sample``'s modifiers for the q/k normalisation (``qknorm``: every pass fused, ``noqknorm``: none,
    ``qkmaxN``: up to N tokens, none of them: ``GraphedModel``'s defaults) and ``cdt`` (inductor's coordinate
    descent tuning, only inside its variant)."""
    import torch._inductor.config as inductor_config
    bench = _bench_sample_module(monkeypatch)
    opts = lambda v: bench._qk_norm_options(set(v.split("-")[1:]))  # noqa: E731
    assert opts("fast-compiled") == {}
    assert opts("fast-compiled-noqknorm") == {"fused_qk_norm": False}
    assert opts("fast-compiled-qknorm") == {"fused_qk_norm": True, "fused_qk_norm_max_tokens": None}
    assert opts("fast-compiled-qkmax324") == {"fused_qk_norm": True, "fused_qk_norm_max_tokens": 324}
    assert bench.check_variant("fast-compiled-qkmax81-cdt") and not bench.check_variant("fast-qkmax")
    before = inductor_config.coordinate_descent_tuning
    with bench._inductor_settings("fast-compiled-cdt"):
        assert inductor_config.coordinate_descent_tuning is True
    with bench._inductor_settings("bf16-compiled-cl-cdt"):              # the decoder variant of --decode-only
        assert inductor_config.coordinate_descent_tuning is True
    with bench._inductor_settings("fast-compiled"):
        assert inductor_config.coordinate_descent_tuning == before
    assert inductor_config.coordinate_descent_tuning == before


def test_fast_decoder_halves_its_batch_when_out_of_memory():
    """A decoder call that runs out of GPU memory is retried with half as many images per call (kept as the
    decoder's ``max_batch``, with a warning), down to one image, where the error propagates."""
    from hmar.accel import FastDecoder
    from hmar.tokenizer import decode_in_chunks
    torch.manual_seed(0)
    tok = VQVAE(tokenizer_config("vqvae-tiny")).eval()
    fd = FastDecoder(tok, dtype=torch.float32, compile=False, max_batch=8)
    real, sizes = fd._decode, []

    def decode(x, limit=2):
        sizes.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(x)

    fd._decode = decode
    f_hat = tok.indices_to_fhat([torch.randint(0, tok.config.vocab_size, (6, p * p)) for p in tok.patch_nums])
    with torch.no_grad(), pytest.warns(UserWarning, match="ran out of GPU memory"):
        img = fd.fhat_to_img(f_hat)
    assert sizes == [6, 4, 2, 2, 2] and fd.max_batch == 2           # 8 -> 6 images in one call, 4, then 3 x 2
    with torch.no_grad():
        assert torch.equal(img, decode_in_chunks(real, f_hat, 2))
        sizes.clear()
        fd.fhat_to_img(f_hat)
    assert sizes == [2, 2, 2]                                          # later calls start at the smaller batch
    fd._decode, fd.max_batch = (lambda x: decode(x, limit=0)), 4
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning), torch.no_grad():
        fd.fhat_to_img(f_hat)


def test_profile_kernel_kinds_sum_the_kernels_by_kind():
    """``benchmarks/_profile.py``'s summary of a profile (what BENCHMARKS.md 3j's table comes from): device-side
    kernels only, each in the first matching kind (hmar's own Triton kernels and cuDNN's SDPA count as attention,
    inductor's ``triton_*`` as inductor even where the ops they fuse name the attention), the rest as "rest", and
    the total equal to their sum; annotation spans (the optimiser's, a step's, a user range) are not kernels."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_profile.py"
    spec = importlib.util.spec_from_file_location("bench_profile", path)
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT", cuda, 4000.0), ("_fwd_kernel", cuda, 1500.0),
              ("_rows_kernel", cuda, 500.0), ("triton_red_fused_add_mul_native_layer_norm_0", cuda, 1000.0),
              ("_dense_kernel", cuda, 800.0), ("triton_poi_fused__to_copy_clamp_dense_attn_infer_exp_2", cuda, 20.0),
              ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", cuda, 700.0),
              ("void at::native::sbtopk::gatherTopK<float>", cuda, 250.0),
              ("void at::native::elementwise_kernel<128, 4>", cuda, 250.0), ("mystery", cuda, 100.0),
              ("aten::mm", cpu, 9999.0),                                  # a host-side op: not a kernel
              ("Optimizer.step#AdamW.step", cuda, 3000.0),                # annotation spans over counted kernels
              ("ProfilerStep#2", cuda, 5000.0)]
    prof = SimpleNamespace(events=lambda: [SimpleNamespace(name=n, device_type=d, device_time=t)
                                           for n, d, t in events]
                           + [SimpleNamespace(name="my_range", device_type=cuda, device_time=777.0,
                                              is_user_annotation=True)])
    kinds = bp.kernel_kinds(prof)
    want = {"GEMM (cuBLAS nvjet / cutlass / xmma)": 4.0,
            "attention (flash / fmha / cuDNN SDPA / hmar's Triton kernels)": 3.5,
            "inductor Triton (fused elementwise / norms)": 1.02, "top-k / sort / scan": 0.25,
            "copies / elementwise (ATen)": 0.25, "rest": 0.1}
    assert {k: v for k, v in kinds.items() if k != "total"} == pytest.approx(want)
    assert kinds["total"] == pytest.approx(9.12)
    # the top kernels: full names, calls and total ms, most first, annotation spans and host-side ops left out
    prof2 = SimpleNamespace(events=lambda: [SimpleNamespace(name=n, device_type=d, device_time=t) for n, d, t in (
        ("triton_poi_fused_a_b_c_d_e_f_g_h_i_j_k_l_m_n_o_p_q_r_s_t_u_v_w_x_y_z_0", cuda, 300.0), ("_fwd_kernel", cuda, 200.0),
        ("triton_poi_fused_a_b_c_d_e_f_g_h_i_j_k_l_m_n_o_p_q_r_s_t_u_v_w_x_y_z_0", cuda, 250.0),
        ("aten::mm", cpu, 9999.0), ("ProfilerStep#2", cuda, 5000.0), ("mystery", cuda, 100.0))])
    top = bp.top_kernels(prof2, n=2)
    assert [(name, calls) for name, calls, _ in top] == [
        ("triton_poi_fused_a_b_c_d_e_f_g_h_i_j_k_l_m_n_o_p_q_r_s_t_u_v_w_x_y_z_0", 2), ("_fwd_kernel", 1)]
    assert [ms for *_, ms in top] == pytest.approx([0.55, 0.2])

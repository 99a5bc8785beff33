"""The CUDA fast path (bf16 + CUDA-graph replay + fast decoder) samples the same tokens as the eager
bf16 model with the same seed. GPU only: skipped without CUDA."""
import pytest
import torch

from hmar import VQVAE, build_model, model_config, tokenizer_config
from hmar.sampling import sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", ["hmar-tiny", "var-tiny"])
def test_graphed_sampling_matches_eager(name):
    from hmar.accel import FastDecoder, GraphedModel
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
    # the bf16 decoder stays close to the fp32 one
    out = sample(fast, tok, [1], generator=0, decode=False)
    ref = tok.fhat_to_img(out.f_hat)
    fd = FastDecoder(tok, compile=False)
    assert (fd.fhat_to_img(out.f_hat) - ref).abs().max() < 0.1

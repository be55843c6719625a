#!/usr/bin/env python3
"""PyTorch's (and fla's) timings of the shapes scripts/gpu-check benchmarks with kiln, run on
the GPU machine beside kiln's. One line per measurement; a section that fails prints one line
and the others go on. Sections run in the order given (default: all, in scripts/gpu-check's
order of priority):
    python3 scripts/gpu-torch.py [matmul attention moe optim qgemm svd topk gla]
    python3 scripts/gpu-torch.py --smoke    # CPU, tiny shapes: checks the script itself runs
"""
import sys
import time

import torch
import torch.nn.functional as F

SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def t(f, n=20):
    """Mean milliseconds of n calls after one warm-up call."""
    n = 1 if SMOKE else n
    f()
    sync()
    s = time.perf_counter()
    for _ in range(n):
        f()
    sync()
    return (time.perf_counter() - s) / n * 1e3


def z(full, small):
    """A benchmark size, or a tiny one in a smoke run."""
    return small if SMOKE else full


def matmul():
    for m, n, k in z([(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (2048, 4096, 4096), (4096, 4096, 4096)],
                     [(1, 64, 64), (16, 64, 32)]):
        a = torch.randn(m, k, device=DEV, dtype=torch.float16)
        b = torch.randn(k, n, device=DEV, dtype=torch.float16)
        ms = t(lambda: a @ b)
        print(f"torch.matmul f16 {m}x{n}x{k}: {ms:.3f} ms, {2 * m * n * k / ms / 1e9:.1f} TFLOP/s")


def attention():
    # Llama-3-8B attention: 32 query heads over 8 KV heads, D = 128, causal, 8K tokens.
    # GQA through repeat_interleave: the flash backend takes equal head counts.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    S, H, Hkv, D = z(8192, 64), 32, 8, 128
    q = torch.randn(1, H, S, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, Hkv, S, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    kk, vv = (x.repeat_interleave(H // Hkv, dim=1).requires_grad_() for x in (k, v))
    flops = 4 * S * S * D * H / 2  # causal
    backend = SDPBackend.MATH if SMOKE else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        ms = t(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True))
        print(f"torch sdpa flash bf16 causal S={S} H={H}/{Hkv} D={D} fwd: {ms:.3f} ms, "
              f"{flops / ms / 1e9:.1f} TFLOP/s (causal FLOPs)")
        g = torch.randn(1, H, S, D, device=DEV, dtype=torch.bfloat16)
        ms = t(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, kk, vv, is_causal=True), (q, kk, vv), g))
        print(f"torch sdpa flash bf16 causal fwd+bwd: {ms:.3f} ms, {3.5 * flops / ms / 1e9:.1f} TFLOP/s (causal FLOPs)")


def gla():
    # fla's chunked GLA (carried as wheels by scripts/gpu-bundle), [B, T, H, D] inputs.
    from fla.ops.gla import chunk_gla
    for T in z([1024, 4096, 16384], [64]):
        # f16, as kiln's line (`kiln bench gla --dtype f16`).
        q, k, v = (torch.randn(16, T, 8, 128, device=DEV, dtype=torch.float16) for _ in range(3))
        g = F.logsigmoid(torch.randn(16, T, 8, 128, device=DEV, dtype=torch.float16))
        print(f"fla chunk_gla f16 B=16 T={T} H=8 D=128: {t(lambda: chunk_gla(q, k, v, g)):.3f} ms")


def moe():
    # Mixtral's layer as PyTorch's dense per-expert loop (the reference MoE forward).
    S, M, Fd, E, K = z(4096, 16), z(4096, 32), z(14336, 64), 8, 2
    bf = torch.bfloat16
    x = torch.randn(S, M, device=DEV, dtype=bf)
    wg = torch.randn(M, E, device=DEV, dtype=bf) * 0.02
    w1 = torch.randn(E, M, Fd, device=DEV, dtype=bf) * 0.02
    w2 = torch.randn(E, Fd, M, device=DEV, dtype=bf) * 0.02

    def layer():
        p = torch.softmax((x @ wg).float(), -1)
        g, ids = p.topk(K, -1)
        g = g / g.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(E):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            h = F.silu(x[tok] @ w1[e]) @ w2[e]
            y.index_add_(0, tok, (h.float() * g[tok, slot, None]).to(bf))
        return y

    ms = t(layer, n=10)
    print(f"torch MoE per-expert loop bf16 Mixtral S={S} M={M} F={Fd} E={E} k={K}: {ms:.3f} ms, "
          f"{4 * K * S * M * Fd / ms / 1e9:.1f} TFLOP/s")


def qgemm():
    # The f16 GEMMs the quantized ones replace, at kiln's W4A16/W8A8 shapes (M x K x N).
    for m in z([1, 16, 64, 256], [1, 4]):
        for k, n in z([(4096, 4096), (4096, 12288), (11008, 4096)], [(64, 32)]):
            a = torch.randn(m, k, device=DEV, dtype=torch.float16)
            b = torch.randn(k, n, device=DEV, dtype=torch.float16)
            print(f"torch.matmul f16 (qgemm shape) {m}x{k}x{n}: {t(lambda: a @ b):.3f} ms")
    # PyTorch's int8 GEMM (cuBLASLt, int32 out; M > 16 and K, N multiples of 8) beside
    # kiln's W8A8, whose int8 tensor-core kernel (w8a8_cmma) gpu-check's tc section times.
    for m in z([64, 256], [32]):
        k, n = z((4096, 4096), (64, 32))
        a = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), device=DEV, dtype=torch.int8)
        try:
            print(f"torch._int_mm int8 {m}x{k}x{n}: {t(lambda: torch._int_mm(a, b)):.3f} ms")
        except (RuntimeError, AttributeError) as e:
            print(f"torch._int_mm int8 {m}x{k}x{n}: unavailable ({str(e).splitlines()[0][:80]})")


def optim():
    # torch.optim.AdamW(fused=True) on 64M f32 parameters (one tensor), and over 200
    # tensors of mixed sizes (kiln: benches/optim.rs's shapes).
    for name, sizes in [("1 tensor of 64M", [z(1 << 26, 1000)]),
                        ("200 mixed tensors", [1 + (i * 7919) % z(65536, 64) for i in range(200)])]:
        ps = [torch.randn(s, device=DEV, requires_grad=True) for s in sizes]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        ms = t(opt.step)
        gb = 4 * sum(sizes) * 7 / 1e9  # param, m, v read and written; grad read
        print(f"torch AdamW fused f32 {name}: {ms:.3f} ms, {gb / ms * 1e3:.1f} GB/s")


def svd():
    # GaLore's projection (torch.linalg.svd of the gradient, full_matrices=False), f32:
    # against kiln's device Jacobi (the frugal update_gap=1 lines).
    for n in z([1024, 4096], [16]):
        g = torch.randn(n, n, device=DEV)
        print(f"torch.linalg.svd f32 {n}x{n}: {t(lambda: torch.linalg.svd(g, full_matrices=False), n=3):.3f} ms")


def topk():
    # torch.topk of |a| at k = n/100 (the exact selection kiln's topk_ef makes, plus the
    # error-feedback arithmetic kiln fuses), 64M f32.
    n = z(1 << 26, 1000)
    g = torch.randn(n, device=DEV)
    e = torch.randn_like(g)

    def topk_ef():
        a = e + g
        _, i = torch.topk(a.abs(), n // 100, sorted=False)
        r = a.clone()
        r[i] = 0
        return i, a[i], r

    print(f"torch topk_ef f32 {n} k=n/100: {t(topk_ef, n=10):.3f} ms")

    # Rand-k as a PyTorch user writes it: a random permutation's first k, sorted, the
    # values scaled by n/k, and the error feedback in place of the fresh `a` (kiln's
    # randk). `randperm` over all n elements is most of its time.
    k = n // 100

    def randk():
        a = e + g
        i = torch.randperm(n, device=DEV)[:k].sort().values
        c = a[i] * (n / k)
        a[i] -= c
        return i, c, a

    print(f"torch randk (randperm) f32 {n} k=n/100: {t(randk, n=10):.3f} ms")


# fla last: Triton compiles and autotunes its kernels on the first call.
SECTIONS = [matmul, attention, moe, optim, qgemm, svd, topk, gla]

if __name__ == "__main__":
    asked = [a for a in sys.argv[1:] if not a.startswith("--")]
    known = {f.__name__: f for f in SECTIONS}
    for name in asked:
        if name not in known:
            sys.exit(f"gpu-torch.py: unknown section {name!r} (known: {' '.join(known)})")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if not SMOKE else 'cpu'}", flush=True)
    for f in [known[a] for a in asked] or SECTIONS:
        try:
            f()
        except Exception as e:  # one line per failed section; the others still run
            print(f"torch {f.__name__} failed: {type(e).__name__}: {e}")
        sys.stdout.flush()

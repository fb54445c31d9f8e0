"""Round-to-nearest weight quantization for the quantized exports, and the same quantize ->
dequantize applied to a tensor, so a check can run our model with exactly the weights a reader of
the file sees.

GGUF types (F32/F16/BF16/Q8_0/Q4_0) are quantized and dequantized by the `gguf` package (numpy,
llama.cpp's reference formats). Q8_0/Q4_0 work on blocks of 32 along a row: a tensor whose rows
are not a multiple of 32 is written F16 instead (llama.cpp's converter falls back the same way),
1-D tensors (norms) stay F32, and in Q4_0 files the embedding and output tables are Q8_0
(llama-quantize keeps them at Q6_K, a type gguf-py cannot write).

W8A16/W4A16 (compressed-tensors `pack-quantized`, what vLLM's WNA16 kernels load): every linear
layer of the decoder blocks, symmetric int with one scale per `group_size` inputs, computed and
applied by compressed-tensors itself (its min-max observer's scale: max|w| / ((qmax - qmin) / 2));
the scale is stored in the export dtype and the integers are computed against that rounded scale,
so dequantization is exact. Embeddings, norms and lm_head stay dense. Round-to-nearest, not GPTQ:
GPTQ needs calibration activations and llm-compressor (its pins conflict with ours); RTN at group
size 128 is the usual baseline and the export stage measures what it costs (perplexity ratio,
top-1 agreement, KL against the unquantized export).
"""

from __future__ import annotations

import numpy as np
import torch

INT_FORMATS = {"w8a16": 8, "w4a16": 4}
GGUF_BLOCK = 32
_TABLES = ("token_embd.weight", "output.weight")


def gguf_tensor_type(fmt: str, gguf_name: str, shape: tuple[int, ...]):
    """The GGMLQuantizationType `fmt` writes tensor `gguf_name` in (gguf_q4_k_m: the F16 file
    llama-quantize starts from)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    base = {"gguf_f32": T.F32, "gguf_f16": T.F16, "gguf_bf16": T.BF16, "gguf_q8_0": T.Q8_0,
            "gguf_q4_0": T.Q4_0, "gguf_q4_k_m": T.F16}[fmt]
    if base == T.Q4_0 and gguf_name in _TABLES:
        base = T.Q8_0
    if base in (T.Q8_0, T.Q4_0) and shape[-1] % GGUF_BLOCK:
        base = T.F16
    return base


def gguf_encode(array: np.ndarray, qtype) -> np.ndarray:
    """`array` (fp32) as the bytes/values written for `qtype`."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), qtype)


def gguf_roundtrip(tensor: torch.Tensor, qtype) -> torch.Tensor:
    """What a GGUF reader gets back for `tensor` written as `qtype` (fp32)."""
    from gguf import quants

    data = gguf_encode(tensor.detach().float().cpu().numpy(), qtype)
    if data.dtype in (np.float32, np.float16):
        return torch.from_numpy(data.astype(np.float32))
    return torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32)).view(tensor.shape)


# --------------------------------------------------------------------------------------------
# compressed-tensors W8A16 / W4A16


def is_int_quantized(hf_name: str) -> bool:
    """The linear layers of the decoder blocks (not the embedding, the norms or lm_head)."""
    return hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")


def int_args(bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                            group_size=group_size, dynamic=False, observer="minmax")


def int_quantize(weight: torch.Tensor, bits: int, group_size: int,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [out, in], scales [out, in / group_size] in `scale_dtype`) by RTN."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = int_args(bits, group_size)
    w = weight.detach().float()
    out_dim, in_dim = w.shape
    if in_dim % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the input size {in_dim}")
    groups = w.view(out_dim, in_dim // group_size, group_size)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group
    q = quantize(w, scale.float(), torch.zeros_like(zero), args, dtype=torch.int8)
    return q, scale


def int_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    return dequantize(q, scale.float(), None, int_args(bits, group_size), dtype=torch.float32)


def int_roundtrip(weight: torch.Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype) -> torch.Tensor:
    q, scale = int_quantize(weight, bits, group_size, scale_dtype)
    return int_dequantize(q, scale, bits, group_size)


def roundtrip(fmt: str, hf_name: str, tensor: torch.Tensor, *, gguf_name: str = "",
              group_size: int = 128, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`tensor` (an HF checkpoint tensor) as a reader of the `fmt` export gets it back (fp32)."""
    if fmt in INT_FORMATS:
        if is_int_quantized(hf_name):
            return int_roundtrip(tensor, INT_FORMATS[fmt], group_size, dtype)
        return tensor.to(dtype).float()
    return gguf_roundtrip(tensor, gguf_tensor_type(fmt, gguf_name, tuple(tensor.shape)))


def write_compressed(hf_dir, out, fmt: str, group_size: int, dtype: torch.dtype) -> None:
    """`out`: the HF directory `hf_dir` with its decoder linears in compressed-tensors
    pack-quantized int (weight_packed int32, weight_scale, weight_shape) and config.json's
    quantization_config written by compressed-tensors' ModelCompressor."""
    import shutil
    from pathlib import Path

    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors import safe_open
    from safetensors.torch import save_file

    bits = INT_FORMATS[fmt]
    hf_dir, out = Path(hf_dir), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors"):
            shutil.copyfile(f, out / f.name)
    tensors = {}
    with safe_open(hf_dir / "model.safetensors", "pt") as src:
        for name in src.keys():
            t = src.get_tensor(name)
            if not is_int_quantized(name):
                tensors[name] = t.to(dtype).contiguous()
                continue
            q, scale = int_quantize(t, bits, group_size, dtype)
            base = name[:-len(".weight")]
            tensors[base + ".weight_packed"] = pack_to_int32(q, bits).contiguous()
            tensors[base + ".weight_scale"] = scale.contiguous()
            tensors[base + ".weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    scheme = QuantizationScheme(targets=["Linear"], weights=int_args(bits, group_size))
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=["lm_head"])
    ModelCompressor(quantization_config=qconfig).update_config(str(out))

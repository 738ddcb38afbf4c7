"""The `cpu` backend: CPU tensors only. Linears run packed quantized weights through torch's int4 kernel (GGUF
Q4_0/Q4_1/Q8_0 blocks, EXL2 at every width, GPTQ; see exllamav2/quant/kernels/cpu_int4.py) and dense weights
through torch's oneDNN GEMM in place. The other ops run the reference code on the CPU until hand-written kernels
replace them (each is registered here so that pinning this backend covers a whole model)."""

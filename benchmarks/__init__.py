"""edge-lora's benchmarks: `python -m benchmarks` runs them all (see benchmarks/README.md).

benchmarks.models    the random-weight models shaped like SmolLM2-135M and Qwen2.5-0.5B, cached
benchmarks.worker    one engine per process, driven by the runner; benchmarks.pool drives them in rounds
benchmarks.peers     llama.cpp, ONNX Runtime GenAI (its own model builder) and transformers + PEFT
benchmarks.roofline  memory bandwidth and bytes per token: the physical limit
benchmarks.scaling   rank, adapters loaded / stacked, context length
benchmarks.probes    what they measure one engine with: memory, the prompt, a swap, an add
benchmarks.model_bench  one model shape's run: peers' files, engines in rounds, cold starts, GPU rows
benchmarks.target_checks   medians, paired ratios, rooflines, targets (benchmarks.memory_budget: memory's)
benchmarks.report    the Summary's markdown (its section tables: benchmarks.summary_tables)
benchmarks.charts    the PNGs
gguf_bench, onnx_bench, train_bench: each backend's own benchmark, also runnable alone
"""

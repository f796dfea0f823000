from setuptools import find_packages, setup

setup(
    name="s2moe-ds",
    version="0.2.0",
    description="S2MoE (arXiv 2503.23007) mixture-of-experts language models trained with DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["s2moe_ds", "s2moe_ds.*"]),
    install_requires=[
        # A range that the CPU wheel 2.13.0 satisfies: install that wheel first, or pip resolves
        # a multi-GB CUDA build on machines without a GPU.
        "torch>=2.10,<2.16",
        # S2MoE subclasses DeepSpeed's MoE and its gate and relies on their attribute names and
        # the sparse-route dispatch of 0.19; newer minor releases must be checked before widening.
        "deepspeed>=0.19.8,<0.20",
        "mpi4py>=3.1",
        "datasets>=2.18",
        # Hugging Face's tokenizer library: trains and runs the subword (BPE) tokenizer.
        "tokenizers>=0.15",
        "tensorboard>=2.14",
        # The analysis plots (routing heatmaps, g(x) histograms, similarity matrices, validation
        # curves) as PNG files and TensorBoard images; the standard library for it.
        "matplotlib>=3.7",
        "ninja",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.2"],
        # The Hugging Face export (launch/consolidate.py --format hf) and loading it in Transformers;
        # tested on 4.57 and 5.25 (5.x reworked the tokenizer and model base classes our adapters
        # subclass; a 6.x must be checked before widening).
        "hf": ["transformers>=4.45,<6", "safetensors>=0.4"],
        # lm-evaluation-harness on the export; its own 'hf' extra brings accelerate, which its
        # Transformers model needs.
        "lm-eval": ["transformers>=4.45,<6", "safetensors>=0.4", "lm_eval[hf]>=0.4.5,<0.5"],
    },
)

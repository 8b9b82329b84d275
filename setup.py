from setuptools import find_packages, setup

setup(
    name="qlk",
    version="0.1.0",
    description="Hand-written Triton kernels for quantized LoRA (QA-LoRA / QLoRA) fine-tuning",
    packages=find_packages(include=["qlk", "qlk.*"]),
    package_data={"qlk": ["data/*.jsonl", "data/*.txt"]},
    python_requires=">=3.10",
    # torch is not pinned here: CI installs the CPU build (torch==2.13.0) first, users keep theirs.
    install_requires=["torch>=2.4", "triton>=3.0", "safetensors>=0.4", "numpy", "tqdm"],
    extras_require={
        "hf": ["transformers>=4.45", "accelerate", "gguf", "matplotlib"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "bitsandbytes>=0.45"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["qlk=qlk.cli:main"]},
)

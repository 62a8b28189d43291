"""Install the ``llm`` toolkit package (``pip install -e .``); pins live in requirements.txt."""

from setuptools import find_packages, setup

setup(
    name="paddle-llm-toolkit",
    version="0.1.0",
    description="PaddleNLP llm/-style fine-tuning, quantization, inference and serving that also runs on CPU",
    packages=find_packages(include=["llm", "llm.*"]),
    python_requires=">=3.10",
    include_package_data=True,
    package_data={"llm.kernels": ["csrc/*.cc", "csrc/*.h"]},  # compiled on first use (llm.kernels.build)
)

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "metamtl" / "version.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="metamtl",
    version=version["__version__"],
    description="Meta-learning and multi-task learning for PyTorch: episodic data, higher-based inner loops, "
                "MAML/Reptile/ANIL and more behind one MetaLearner API.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["metamtl", "metamtl.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "higher>=0.2.1",
        "wandb",
        "tqdm",
        "pyyaml",
        "numpy",
        "pillow",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest>=7", "hypothesis"]},
    entry_points={"console_scripts": ["metamtl=metamtl.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

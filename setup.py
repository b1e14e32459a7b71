from setuptools import find_packages, setup

setup(
    name="stepvideo",
    version="0.1.0",
    description="Inference stack for StepFun's Step-Video-T2V text-to-video model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["stepvideo", "stepvideo.*", "api"]),
    include_package_data=True,
    package_data={"stepvideo": ["assets/*.txt", "assets/*.json"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.44,<5",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "flask>=3.0",
        "waitress>=3.0",
        "requests>=2.31",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "einops>=0.7",
        "huggingface_hub>=0.24",
        "tqdm>=4.66",
        "numpy>=1.24",
        "pillow>=10",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6", "yunchang==0.6.4"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
)

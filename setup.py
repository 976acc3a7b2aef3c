"""mmfisher: Group Fisher channel pruning for OpenMMLab 3.x.

torch is deliberately not in install_requires: GPU users bring their own build and
an unpinned torch would pull several GB of CUDA packages. tools/setup_env.sh
installs torch==2.13.0 (CPU) where none is installed, then mmcv with compiled ops.
"""
from setuptools import find_packages, setup

setup(
    name='mmfisher',
    version='0.1.0',
    description='Group Fisher channel pruning (ICML 2021) for mmdet 3.x / mmpretrain',
    packages=find_packages(exclude=('tests', 'tools', 'configs')),
    python_requires='>=3.8',
    install_requires=[
        'mmengine>=0.10.0,<0.11',
        'mmcv==2.1.0',
        'mmdet==3.3.0',
        'mmpretrain==1.2.0',
        'numpy',
        'scikit-learn',  # mmdet's PAA head fits a GMM when training
    ],
    # the tests build mmdet's BoxInst, whose data preprocessor needs scikit-image, and OC-SORT, whose
    # tracker needs lap
    extras_require={'tests': ['pytest>=7', 'onnx', 'onnxruntime', 'scikit-image', 'lap'],
                    'onnx': ['onnx', 'onnxruntime'],
                    # what mmdet's BoxInst and tracking configs import when built (the support matrix)
                    'zoo': ['scikit-image', 'lap', 'motmetrics']},
)

import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings('ignore', category=UserWarning)
warnings.filterwarnings('ignore', category=FutureWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
    """The generated shapes detection dataset (16 train / 4 val images of 128x128), demo class names."""
    from mmfisher.datasets.shapes import SHAPES, make_coco_shapes
    root = str(tmp_path_factory.mktemp('shapes')) + '/'
    make_coco_shapes(root, num_train=16, num_val=4, size=128, names=SHAPES)
    return root

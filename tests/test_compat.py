"""mmfisher's OpenMMLab layer leaves the rest of the process as it found it: the torchvision fallback is a
proper module (find_spec works) and never shadows a real torchvision; PrunedModel never replaces another
registration of that name."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def python(code, extra_path=None):
    path = [ROOT] + ([str(extra_path)] if extra_path else []) + [os.environ.get('PYTHONPATH', '')]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_fallback_is_installed_for_mmpretrain_with_a_proper_module_spec():
    res = python('''
        import importlib.util, sys
        from mmfisher.openmmlab import register_all_modules
        register_all_modules()
        import mmpretrain.models                          # imports torchvision at module level
        spec = importlib.util.find_spec('torchvision')    # raised ValueError with __spec__ = None
        print('origin', spec.origin)
        print('sub', importlib.util.find_spec('torchvision.ops.boxes').name)
    ''')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'torchvision_fallback.py' in res.stdout and 'sub torchvision.ops.boxes' in res.stdout


def test_mmdet_reid_models_see_mmpretrain_after_register_all_modules():
    # mmdet's ReID data preprocessor imports mmpretrain when mmdet.models is first imported (importing
    # mmfisher does it); if that failed once (no torchvision), it refused to build ("mim install mmpretrain")
    res = python('''
        from mmfisher.openmmlab import register_all_modules
        register_all_modules()
        from mmdet.models.data_preprocessors import reid_data_preprocessor
        print('mmpretrain seen', reid_data_preprocessor.mmpretrain is not None)
    ''')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'mmpretrain seen True' in res.stdout


def test_a_real_torchvision_is_never_shadowed(tmp_path):
    pkg = tmp_path / 'torchvision'
    pkg.mkdir()
    (pkg / '__init__.py').write_text("__version__ = '9.9-real'\n")
    res = python('''
        from mmfisher.compat import torchvision_fallback
        from mmfisher.openmmlab import register_all_modules
        assert not torchvision_fallback.install()
        import torchvision
        print(torchvision.__version__, torchvision_fallback.installed())
    ''', extra_path=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '9.9-real False' in res.stdout


def test_pruned_model_does_not_replace_another_registration():
    res = python('''
        from mmengine.registry import MODELS
        def mine(**kwargs):
            return None
        MODELS.register_module(name='PrunedModel', module=mine)
        import mmfisher
    ''')
    assert res.returncode != 0
    assert "already holds a 'PrunedModel' (__main__.mine)" in res.stderr, res.stderr[-2000:]
    res = python('''
        import importlib
        import mmfisher.openmmlab.builder as b
        importlib.reload(b)                               # its own registration may be replaced
        from mmengine.registry import MODELS
        print(MODELS.module_dict['PrunedModel'] is b.build_pruned_model)
    ''')
    assert res.returncode == 0 and 'True' in res.stdout, res.stderr[-2000:]

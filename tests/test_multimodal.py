"""mmpretrain's image-text models, which have no 'tensor' mode of their own (BLIP's VQA, OFA, Chinese CLIP):
the tensor forward the analysis traces is what their loss or predict runs, on generated texts, and the
tokenizers they download by name are generated. They need transformers, which comes from .language_env
(tools/setup_env.sh) on a subprocess's path only: with it importable, mmpretrain registers its multimodal
models."""
import json
import os
import os.path as osp
import subprocess
import sys
import textwrap

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
LANGUAGE_ENV = osp.join(ROOT, '.language_env')


def _run_with_transformers(code, tmp_path, timeout=600):
    assert osp.isdir(osp.join(LANGUAGE_ENV, 'transformers')), 'run tools/setup_env.sh (step 5)'
    script = tmp_path / 'script.py'
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, osp.join(ROOT, 'tests'), LANGUAGE_ENV]))
    res = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_blip_vqa_tensor_forward_scores_the_answers_its_loss_scores(tmp_path):
    """The answer scores of ``vqa_forward`` give, by a cross-entropy written out here, the loss BLIP's own
    ``loss`` computes on the same batch (one answer per question, weight 1, dropout off): the traced
    forward runs the network the loss trains, image tower, fusion and answer decoder."""
    out = _run_with_transformers('''
        import copy, json
        import torch
        import mmfisher.openmmlab
        from mmengine.config import Config
        from helpers import config_path
        from mmfisher.openmmlab import build_from_config
        from mmfisher.openmmlab.analysis import tensor_forward, example_samples
        from mmfisher.openmmlab.synthetic import generated_language_model, random_batch
        cfg = Config.fromfile(config_path('mmpretrain', 'blip/blip-base_8xb32_okvqa.py'))
        cfg.model.tokenizer.name_or_path = generated_language_model('bert')
        cfg.model.vision_backbone.update(arch='deit-tiny', img_size=224)     # small: 192 wide
        cfg.model.multimodal_backbone.med_config.update(num_hidden_layers=2, encoder_width=192)
        cfg.model.head.decoder.med_config.update(num_hidden_layers=2)
        torch.manual_seed(0)
        model = build_from_config(cfg).eval()                  # eval: no dropout in either computation
        x, samples = random_batch(model, 3, (224, 224))
        for s in samples:
            s.gt_answer, s.gt_answer_weight = s.gt_answer[:1], [1.0]
        with torch.no_grad():
            theirs = float(model.loss(x, copy.deepcopy(samples))['vqa_loss'])
            visual, fused, scores = tensor_forward(model, x, samples)
        tok = model.tokenizer
        answers = tok([s.gt_answer[0] for s in samples], padding='longest', return_tensors='pt').input_ids
        total = 0.0
        for i in range(len(samples)):                      # next-token cross-entropy, token by token
            for t in range(answers.shape[1] - 1):
                target = int(answers[i, t + 1])
                if target != tok.pad_token_id:
                    total -= float(torch.log_softmax(scores[i, t].double(), 0)[target])
        print(json.dumps(dict(theirs=theirs, ours=total / len(samples), visual=list(visual.shape),
                              fused=list(fused.shape), questions=[s.question for s in samples])))
    ''', tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    assert abs(r['ours'] - r['theirs']) <= 1e-4 * abs(r['theirs']), r
    assert r['visual'] == [3, 197, 192] and r['fused'][0] == 3 and r['fused'][2] == 768, r
    assert len(set(r['questions'])) > 1


def test_a_generated_bpe_tokenizer_spells_any_text_as_ofa_reads_it(tmp_path):
    """OFA's tokenizer, loaded from the generated folder as from its download: any text round-trips (byte by
    byte), and OFA's 8192 image codes and 1000 location bins come after the generated vocabulary."""
    out = _run_with_transformers('''
        import json
        import mmfisher.openmmlab
        from mmfisher.openmmlab.synthetic import generated_bpe_tokenizer
        from mmpretrain.models.utils.tokenizer import OFATokenizer
        tok = OFATokenizer.from_pretrained(generated_bpe_tokenizer('bpe'))
        text = ' which region does the text " the large circle " describe? (über, 42%)'
        ids = tok(text).input_ids
        print(json.dumps(dict(back=tok.decode(ids, skip_special_tokens=True), n=len(ids), size=len(tok),
                              bin_offset=tok.bin_offset, code_offset=tok.code_offset, pad=tok.pad_token_id)))
    ''', tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    text = ' which region does the text " the large circle " describe? (über, 42%)'
    assert r['back'] == text
    assert r['n'] == len(text.encode()) + 2                  # one token per byte, <s> and </s>
    assert r['code_offset'] == 4 + 256 + 1 and r['bin_offset'] == r['code_offset'] + 8192
    assert r['size'] == r['bin_offset'] + 1000 and r['pad'] == 1


def test_zoo_check_runs_blip_ofa_and_chinese_clip_on_generated_tokenizers(tmp_path):
    """BLIP's VQA passes (train step and predict on the compact model); OFA and Chinese CLIP, which have
    no loss in mmpretrain, are checked on their tensor outputs ('features only'). Each row says which
    tokenizer was generated."""
    from helpers import config_path
    configs = [config_path('mmpretrain', 'blip/blip-base_8xb32_okvqa.py'),
               config_path('mmpretrain', 'ofa/ofa-base_zeroshot_vqa.py'),
               config_path('mmpretrain', 'chinese_clip/cn-clip_resnet50_zeroshot-cls_cifar100.py')]
    res = subprocess.run([sys.executable, 'tools/analysis_tools/zoo_check.py', '--configs', *configs,
                          '--json', str(tmp_path / 'matrix.json'), '--md', str(tmp_path / 'matrix.md')],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {osp.basename(r['config']): r for r in json.load(open(tmp_path / 'matrix.json'))}
    blip = rows['blip-base_8xb32_okvqa.py']
    assert blip['status'] == 'pass' and blip['max_rel_err'] <= 1e-4, blip
    assert 'BERT tokenizer generated' in blip['note'] and blip['parts']['backbone'][1] > 0, blip
    ofa = rows['ofa-base_zeroshot_vqa.py']
    assert ofa['status'] == 'features only' and ofa['max_rel_err'] <= 1e-4 and 'BPE tokenizer generated' in ofa['note'], ofa
    clip = rows['cn-clip_resnet50_zeroshot-cls_cifar100.py']
    assert clip['status'] == 'features only' and clip['max_rel_err'] <= 1e-4, clip
    assert clip['prunable_groups'] > 0 and 'no loss in mmpretrain' in clip['note'], clip

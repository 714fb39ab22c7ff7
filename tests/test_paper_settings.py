"""The recipes in the paper's settings, checked against the reference code's facts (../shared/cds-method.md, CIFAR/train.py and
CIFAR/distill.py of the reference): what `distill.py --setting cifar` and `semisup.py --dataset cifar10` build on the smoke data
(optimiser, its hyper-parameters, the schedule's milestones, the views, the networks' classifier, the teacher in train mode with
its heads, best-epoch reporting), `imagenet.py`'s default stem, and the errors of `cifar.py --arch` and `distill.py --teacher-file`.

No test imports a recipe: one process runs the recipes as scripts (`runpy`, fastai imported once) with `Learner.fit` patched to
describe the Learner it is called on at its first training batch, then cancel the fit (the recipe goes on: its table, its
export); the description comes back as JSON."""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'COLUMNS': '2000'}

PROBE = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, time, warnings
    warnings.filterwarnings('ignore')
    import torch, torch.nn as nn
    from fastai.learner import Learner
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.schedule import ParamScheduler
    from torch.nn.modules.batchnorm import _BatchNorm

    def describe(t):
        "A transform's name and plain attributes"
        vals = {k: (tuple(v.flatten().tolist()) if hasattr(v, 'shape') else v) for k, v in vars(t).items() if not k.startswith('_')}
        return {'name': type(t).__name__, **{k: v for k, v in vals.items() if isinstance(v, (bool, int, float, str, tuple))}}

    def teacher_of(cb):
        "The `Teacher` a callback distils from, if any"
        d = getattr(cb, 'distiller', None)
        return getattr(d, 'teacher', None) if d is not None else getattr(cb, 'teacher', None)

    class Record(Callback):
        "Describes the Learner at its first training batch, then cancels the fit"
        order = 99
        def before_fit(self):
            self.seen, self.hooks = {'bn_training': [], 'heads_ran': False}, []
            for t in filter(None, map(teacher_of, self.learn.cbs)):
                for m in t.model.modules():
                    if isinstance(m, _BatchNorm):
                        self.hooks.append(m.register_forward_hook(lambda m, i, o: self.seen['bn_training'].append(m.training)))
                if hasattr(t.model, 'heads'):
                    self.hooks.append(t.model.heads[0].register_forward_hook(lambda *a: self.seen.update(heads_ran=True)))
        def after_batch(self):
            if not self.training: return
            learn, m = self.learn, self.learn.model
            plain = m.model if type(m).__name__ == 'DeepSupervisionModel' else m
            ps = next((cb for cb in learn.cbs if isinstance(cb, ParamScheduler)), None)
            cds = next((cb for cb in learn.cbs if type(cb).__name__ == 'CDSCallback'), None)
            semi = next((cb for cb in learn.cbs if type(cb).__name__ == 'SemiSupervisedCallback'), None)
            best = next((cb for cb in learn.cbs if type(cb).__name__ == 'BestMetrics'), None)
            conv = next(c for c in plain.modules() if isinstance(c, nn.Conv2d))
            ds = learn.dls.train_ds
            of = learn.opt_func
            FACTS[-1]['fits'].append(dict(
                opt_func=getattr(of, 'func', of).__name__, opt_keywords={k: v for k, v in getattr(of, 'keywords', {}).items()},
                opt_cbs=[c.__name__ for c in learn.opt.cbs], hypers=[{k: float(v) for k, v in h.items()} for h in learn.opt.hypers],
                wd=learn.wd, wd_bn_bias=learn.wd_bn_bias, n_epoch=learn.n_epoch,
                lr_by_epoch_of_300=[float(ps.scheds['lr']((k + .01)/300)) for k in range(300)] if ps and 'lr' in ps.scheds else None,
                view1=[describe(t) for t in learn.dls.train.after_batch.fs], view2=[describe(t) for t in cds.view2_tfms] if cds else None,
                linears=[(n, c.in_features, c.out_features) for n, c in plain.named_modules() if isinstance(c, nn.Linear)],
                first_conv=(conv.kernel_size, conv.stride), maxpools=sum(isinstance(c, nn.MaxPool2d) for c in plain.modules()),
                model=type(plain).__name__, cbs=[type(cb).__name__ for cb in learn.cbs], best_monitor=getattr(best, 'monitor', None),
                teachers=[dict(has_heads=t.has_heads, bn_train=t.bn_train, model=type(t.plain).__name__,
                               fc=[(n, c.in_features) for n, c in t.plain.named_modules() if isinstance(c, nn.Linear)])
                          for t in filter(None, map(teacher_of, learn.cbs))],
                teacher_bn_training=sorted(set(self.seen['bn_training'])), teacher_heads_ran=self.seen['heads_ran'],
                train_items=len(ds), train_labels=ds.labels.bincount().tolist() if hasattr(ds, 'labels') else None,
                bs=learn.dls.train.bs, unlabelled=(len(semi.dl.dataset), semi.dl.bs) if semi else None))
            raise CancelFitException()
        def after_fit(self):
            for h in self.hooks: h.remove()

    fit = Learner.fit
    def recorded_fit(self, *args, cbs=None, **kwargs):
        return fit(self, *args, cbs=[*(cbs if isinstance(cbs, list) else [cbs] if cbs else []), Record()], **kwargs)
    Learner.fit = recorded_fit

    FACTS = []
    for job in json.loads(sys.argv[1]):
        FACTS.append({'job': job, 'fits': [], 'start': time.perf_counter()})
        sys.argv, out, err = job, io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): runpy.run_path(job[0], run_name='__main__')
            FACTS[-1]['exit'] = 0
        except SystemExit as e:  # a message as its code: what Python prints on stderr as the process exits with status 1
            FACTS[-1]['exit'] = 1 if isinstance(e.code, str) else e.code
            if isinstance(e.code, str): print(e.code, file=err)
        FACTS[-1].update(stdout=out.getvalue(), stderr=err.getvalue(), secs=time.perf_counter() - FACTS[-1]['start'])
    print(json.dumps(FACTS))
""")

JOBS = {
    'distill': ['recipes/distill.py', '--smoke', '--setting', 'cifar', '--export', ''],
    'semisup': ['recipes/semisup.py', '--smoke', '--dataset', 'cifar10', '--export', ''],
    'imagenet': ['recipes/imagenet.py', '--smoke', '--method', 'base', '--export', ''],
    'imagenet help': ['recipes/imagenet.py', '--help'],
    'cifar unknown arch': ['recipes/cifar.py', '--smoke', '--arch', 'resnet34'],
    'distill no heads': ['recipes/distill.py', '--smoke', '--setting', 'cifar', '--teacher', 'resnet18', '--teacher-file', '{no_heads}'],
}


def probe(jobs:list)->list:
    r = subprocess.run([sys.executable, '-c', PROBE, json.dumps(jobs)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


@pytest.fixture(scope='module')
def facts(tmp_path_factory):
    "{job: what the recipe built at each fit, its exit status and output}"
    import torch
    from fastai_cds.architectures import cifar_model
    no_heads = tmp_path_factory.mktemp('teacher')/'base.pth'
    torch.save(cifar_model('resnet18', 10).state_dict(), no_heads)  # what `cifar.py --method base --save-model` writes: no heads
    return dict(zip(JOBS, probe([[a.format(no_heads=no_heads) for a in j] for j in JOBS.values()])))


def check_ok(f:dict):
    assert f['exit'] in (0, None), f['stdout'][-2000:] + f['stderr'][-4000:]


# ---- the reference's facts (CIFAR/train.py, CIFAR/distill.py), written here from cds-method.md
def assert_reference_optimiser(fit:dict):
    "SGD (torch: momentum 0.9, dampening 0, nesterov False; fastai: L2 added to the gradient, then momentum, then the step), wd 5e-4"
    assert fit['opt_func'] == 'SGD' and fit['opt_keywords'] == {'mom': 0.9, 'decouple_wd': False}, fit['opt_func']
    assert fit['opt_cbs'] == ['l2_reg', 'average_grad', 'momentum_step'], fit['opt_cbs']  # torch's SGD(nesterov=False, dampening=0)
    assert fit['wd'] == 5e-4 and fit['wd_bn_bias'], (fit['wd'], fit['wd_bn_bias'])  # on every parameter, BatchNorm and biases too
    for h in fit['hypers']: assert h['mom'] == 0.9 and h['wd'] == 5e-4 and h['lr'] == pytest.approx(0.1), h
    assert 'dampening' not in fit['opt_keywords'] and 'nesterov' not in fit['opt_keywords']


def assert_reference_schedule(fit:dict):
    """lr 0.1, /10 at epochs 90, 180 and 280 of 300 (the smoke's single epoch stands for the 300: the schedule is in fractions of the
    fit; each epoch read just after its start: fastai compares the fit's fraction with float32 bounds)"""
    lrs = fit['lr_by_epoch_of_300']
    assert lrs is not None, 'no ParamScheduler on lr'
    drops = [k for k in range(1, 300) if lrs[k] < lrs[k-1] - 1e-12]
    assert drops == [90, 180, 280], drops
    assert [lrs[k] for k in (0, 100, 200, 299)] == pytest.approx([0.1, 0.01, 1e-3, 1e-4])


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

def assert_reference_views(fit:dict, size:int=16):
    """View 1: pad 4 (grey) + crop, flip, Cutout 16 before Normalize; view 2: pad 4 (black) + crop, flip, jitter (0.4, 0.4, 0.4,
    0.1) p=0.8, grayscale 0.2 (pad and Cutout scaled to the smoke's 16 px)"""
    v1 = {t['name']: t for t in fit['view1']}
    names = [t['name'] for t in fit['view1']]
    assert {'PadCropFlip', 'Cutout', 'Normalize'} <= set(names) and names.index('Cutout') < names.index('Normalize'), names
    pcf = v1['PadCropFlip']
    assert pcf['padding'] == 4*size//32 and pcf['fill'] == pytest.approx(128/255) and pcf['p_flip'] == 0.5, pcf
    assert v1['Cutout']['size'] == 16*size//32
    assert v1['Normalize']['mean'] == pytest.approx(CIFAR_MEAN) and v1['Normalize']['std'] == pytest.approx(CIFAR_STD)
    assert not {'RandomResizedCropBatch', 'Flip', 'Brightness', 'Contrast'} & set(names), names  # fastai's aug_transforms: none
    v2 = {t['name']: t for t in fit['view2']}
    assert set(v2) == {'PadCropFlip', 'ColorJitterBatch', 'RandomGrayscale'}, list(v2)
    assert v2['PadCropFlip']['padding'] == 4*size//32 and v2['PadCropFlip']['fill'] == 0 and v2['PadCropFlip']['p_flip'] == 0.5
    j = v2['ColorJitterBatch']
    assert (j['brightness'], j['contrast'], j['saturation'], j['hue'], j['p_img']) == (0.4, 0.4, 0.4, 0.1, 0.8), j
    assert v2['RandomGrayscale']['p_img'] == 0.2


def assert_cifar_resnet(fit:dict, width:int, n_out:int=10):
    "The reference's CIFAR ResNet: 3x3 stride-1 first conv, no max-pool, one fc from the pooled final stage"
    assert fit['model'] == 'ResNet' and fit['first_conv'] == [[3, 3], [1, 1]] and fit['maxpools'] == 0, fit['first_conv']
    assert fit['linears'] == [['fc', width, n_out]], fit['linears']


def test_distill_cifar_setting_is_the_reference(facts):
    "distill.py --setting cifar: the teacher (ResNet50, CDS) and the student (ResNet18, CDS + KD) in the reference's setting"
    f = facts['distill']
    check_ok(f)
    assert len(f['fits']) == 2, [x['cbs'] for x in f['fits']]  # the smoke trains its teacher (as cifar.py would), then the student
    teacher_fit = f['fits'][0]
    assert 'CDSCallback' in teacher_fit['cbs'] and not teacher_fit['teachers'], teacher_fit['cbs']
    assert_reference_optimiser(teacher_fit); assert_reference_schedule(teacher_fit); assert_reference_views(teacher_fit)
    assert_cifar_resnet(teacher_fit, 2048)


def test_distill_cifar_student_and_teacher(facts):
    f = facts['distill']
    check_ok(f)
    assert len(f['fits']) == 2, "no student fit recorded"
    student = f['fits'][1]
    assert_reference_optimiser(student); assert_reference_schedule(student); assert_reference_views(student)
    assert_cifar_resnet(student, 512)
    assert 'CDSCallback' in student['cbs'] and 'DistillCallback' in student['cbs'], student['cbs']
    assert student['teachers'] == [dict(has_heads=True, bn_train=True, model='ResNet', fc=[['fc', 2048]])], student['teachers']
    assert student['teacher_bn_training'] == [True] and student['teacher_heads_ran'], student['teacher_bn_training']
    assert student['bs'] == 8 and student['best_monitor'] == 'accuracy' and 'BestMetrics' in student['cbs']
    assert '83.31' in f['stdout'] and 'paper top-1 (%)' in f['stdout'], f['stdout'][-2000:]  # Table 8, ResNet18 student, CDS + KD


def test_semisup_cifar_setting_is_the_reference(facts):
    "semisup.py on CIFAR: cifar.py's reference setting on a stratified labelled fraction, the rest as the unlabelled stream, the seed said"
    f = facts['semisup']
    check_ok(f)
    (fit,) = f['fits']
    assert_reference_optimiser(fit); assert_reference_schedule(fit); assert_reference_views(fit); assert_cifar_resnet(fit, 512)
    assert 'CDSCallback' in fit['cbs'] and 'SemiSupervisedCallback' in fit['cbs'] and fit['best_monitor'] == 'accuracy', fit['cbs']
    assert fit['train_labels'] == [1]*10 and fit['train_items'] == 10, fit['train_labels']  # the smoke folder: 3 per class, 1 labelled
    assert fit['unlabelled'] == [20, 8], fit['unlabelled']
    assert '10 labelled, 20 unlabelled, seed 0' in f['stdout'], f['stdout'][-2000:]


def test_imagenet_default_is_the_reference_stem(facts):
    "imagenet.py builds the reference's network by default (no max-pool), and its docstring and --help say so"
    f = facts['imagenet']
    check_ok(f)
    (fit,) = f['fits']
    assert fit['model'] == 'ResNet' and fit['maxpools'] == 0 and fit['first_conv'] == [[7, 7], [2, 2]], (fit['maxpools'], fit['first_conv'])
    assert fit['opt_func'] == 'SGD' and fit['wd'] == 1e-4
    help_line = next(l for l in facts['imagenet help']['stdout'].splitlines() if l.strip().startswith('--reference-stem'))
    assert '(default: True)' in help_line, help_line
    doc = ast.get_docstring(ast.parse((ROOT/'recipes'/'imagenet.py').read_text()))
    assert '(`--reference-stem`, the default)' in doc and '`--no-reference-stem` keeps' in doc, doc


def test_cifar_unknown_arch_lists_the_choices(facts):
    from fastai_cds.architectures import CIFAR_ARCHS
    f = facts['cifar unknown arch']
    assert f['exit'] not in (0, None) and not f['fits'], f['stderr'][-2000:]  # before any training (and any data)
    assert 'Traceback' not in f['stderr'] and all(a in f['stderr'] for a in CIFAR_ARCHS), f['stderr'][-2000:]


def test_distill_refuses_a_teacher_without_heads(facts):
    f = facts['distill no heads']
    assert f['exit'] not in (0, None) and not f['fits'], f['stderr'][-2000:]  # no teacher nor student trained
    assert 'Traceback' not in f['stderr'] and 'without CDS heads' in f['stderr'] and '--method cds' in f['stderr'], f['stderr'][-2000:]


def test_split_labelled_in_memory_images():
    "semisup's CIFAR loader keeps the images in memory: the split is stratified, seeded, and the two parts partition the training set"
    import torch
    from fastai_cds.tensor_data import tensor_dls
    from fastai_cds.semi import split_labelled
    ims, y = torch.arange(40*3*2*2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(40, 3, 2, 2), torch.arange(40) % 4
    ims[:, 0, 0, 0] = torch.arange(40, dtype=torch.uint8)  # each image tells its index
    dls = tensor_dls((ims, y), (ims[:8], y[:8]), list('abcd'), bs=4)
    (a, ua), (b, _), (c, _) = [split_labelled(dls, 0.3, s, 6) for s in (0, 0, 1)]
    ids = lambda ds: sorted(ds.images[:, 0, 0, 0].tolist())
    assert a.train_ds.labels.bincount().tolist() == [3]*4 and len(ua.dataset) == 28 and ua.bs == 6
    assert sorted(ids(a.train_ds) + ids(ua.dataset)) == list(range(40))
    assert ids(a.train_ds) == ids(b.train_ds) and ids(a.train_ds) != ids(c.train_ds)

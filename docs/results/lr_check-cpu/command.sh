#!/bin/bash
# Does the learning rate the 500-step tuning stage picked hold at the 1000-step budget of the studies?
# Each family at its tuned value and at the old shared 5e-3, seeds 0-2, in one sweep dir (resumable).
cd /work/roadmap && . /work/main/.venv/bin/activate && export PYTHONPATH=/work/roadmap/src OMP_NUM_THREADS=1
common="task_name=studies group=study-lr_check-cpu experiment=study_cpu seed=0,1,2 trainer.precision=32-true hydra.sweep.dir=/work/main/outputs/studies/multirun/study-lr_check-cpu"
python train.py -m $common model=dense optim.lr=0.005,0.007
python train.py -m $common model=moe routing=topk experts=8 optim.lr=0.0035,0.005
python train.py -m $common model=sectional model.sectional_every=2 routing=segment_fixed experts=4 ++routing.top_k=1 optim.lr=0.005,0.007

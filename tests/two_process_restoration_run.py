"""Run by ``test_restoration_multiprocess.py`` under ``accelerate launch`` with two CPU processes: a tiny paired-
restoration run; each process writes its rank, world size, step and a checksum of its weights."""

import json
import sys

import torch
from diffusers import UNet2DModel

from diffusers_ext.schedulers import ResShiftScheduler
from diffusers_ext.training import PairedRestorationObjective, Trainer, TrainingConfig
from diffusers_ext.training.restoration_data import DegradedPatchDataset, make_degradation

output = sys.argv[1]
torch.manual_seed(0)
data = DegradedPatchDataset(torch.rand(32, 3, 16, 16) * 2 - 1, make_degradation("gaussian_noise", std=0.1), seed=0)
unet = UNet2DModel(sample_size=16, in_channels=6, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
trainer = Trainer(PairedRestorationObjective(ResShiftScheduler(num_train_timesteps=4)), unet, data,
                  TrainingConfig(output_dir=output, max_steps=4, batch_size=4, checkpoint_every=2))
result = trainer.train()
state = trainer.accelerator
checksum = sum(float(p.double().sum()) for p in result.model.parameters())
with open(f"{output}/process-{state.process_index}.json", "w") as file:
    json.dump({"processes": state.num_processes, "step": result.step, "checksum": checksum}, file)
if state.is_main_process:
    result.model.save_pretrained(f"{output}/model")

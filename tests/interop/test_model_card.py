"""Tests for corinfomax_jax.interop.model_card: what a card says for each kind of record."""
import numpy as np

from corinfomax_jax.interop import model_card

_PREP = model_card.preprocessing(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261),
                                 image_size=32, test_resize_ratio=1.0)
_CONFIG = {"method": "vicreg", "vicreg": {"sim_weight": 25.0, "var_weight": 25.0},
           "dataset": "cifar10", "train_split": "train", "optimizer": "lars",
           "learning_rate": 0.3, "batch_size": 256, "base_batch_size": 256,
           "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 10.0,
           "min_learning_rate": 0.0, "seed": 1, "num_epochs": 100, "max_steps": -1}


def _card(**changes):
  args = dict(
      record={"model": {"backbone": "resnet18", "cifar_stem": True, "width": 64,
                        "projector": [2048, 64], "projector_bn": False,
                        "dtype": "float32"},
              "data": {"dataset": "cifar10", "image_size": 32}, "steps_per_epoch": 195,
              "num_train_examples": 50000,
              "spectra": [[390, [4.0, 1.0, 1e-9]], [780, list(np.full(4, 0.25))]]},
      config=_CONFIG, config_source="the workdir's config.json", step=780,
      evaluations={"knn": None, "linear": None, "finetune": None},
      files={"safetensors": "backbone.safetensors", "msgpack": "backbone.msgpack"},
      sha256={"backbone.safetensors": "ab" * 32}, prep=_PREP)
  args.update(changes)
  return model_card.model_card(**args)


def test_a_cifar_card_names_method_data_licence_spectrum_and_loading():
  card = _card()
  assert card.startswith("# resnet18 (CIFAR stem), vicreg, cifar10, step 780\n")
  assert "- vicreg: sim_weight = 25.0, var_weight = 25.0." in card
  assert "- Step 780 of a schedule of 100 epochs: 4.00 epochs (195 steps per epoch, " \
      "50000 images)." in card
  assert ("CIFAR-10 (Alex Krizhevsky, \"Learning multiple layers of features from tiny "
          "images\", 2009; https://www.cs.toronto.edu/~kriz/cifar.html)") in card
  # The last spectrum recorded: four equal eigenvalues have effective rank 4.
  assert ("at step 780: dimension 4, effective rank 4.00, eigenvalues from 0.25 to 0.25, "
          "4 above 1e-1, 0 below 1e-8.") in card
  assert "- None in the workdir (run --mode=knn_eval" in card
  assert "resize the shorter side to 32 px (bicubic), centre crop 32 x 32" in card
  # Width 64 with the CIFAR stem: torchvision's snippet with the stem replaced.
  assert "net = torchvision.models.resnet18()\n" \
      "net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem\n" \
      "net.maxpool = torch.nn.Identity()\nnet.fc = torch.nn.Identity()\n" \
      "net.load_state_dict(load_file(\"backbone.safetensors\"), strict=True)" in card
  assert f"- `backbone.safetensors`: sha256 `{'ab' * 32}`" in card


def test_evaluations_give_numbers_protocol_and_their_step():
  linear = {"variant": "augmented", "epochs": 100, "batch_size": 256, "lr": 0.1,
            "schedule": "cosine", "momentum": 0.9, "weight_decay": 0.0,
            "dataset": "cifar10", "train_split": "train", "eval_split": "test",
            "num_test_examples": 10000, "top1": 88.125, "top5": 99.5,
            "pretrain_step": 780}
  finetune = {"random_init": False, "num_labelled": 500, "label_fraction": 0.01,
              "dataset": "cifar10", "train_split": "train", "eval_split": "test",
              "epochs": 20, "batch_size": 256, "backbone_lr": 0.01, "head_lr": 0.1,
              "weight_decay": 5e-4, "top1": 51.0, "top5": 90.0, "pretrain_step": 390,
              "best": {"top1": 52.5, "epoch": 17, "chosen_on": "the test split (test), "
                                                               "as the paper reports it"}}
  card = _card(evaluations={"knn": None, "linear": linear, "finetune": finetune})
  assert ("- Linear probe (augmented; frozen backbone, 100 epochs, batch 256, SGD lr 0.1 "
          "(cosine), momentum 0.9, weight decay 0; trained on cifar10 train, tested on "
          "10000 test images): top-1 88.12, top-5 99.50.") in card
  assert ("- Fine-tuning (whole network on 500 labelled images (0.01 of cifar10 train), "
          "20 epochs, batch 256, backbone lr 0.01, head lr 0.1, weight decay 0.0005; "
          "tested on test): top-1 51.00, top-5 90.00 after the last epoch (best 52.50 at "
          "epoch 17, chosen on the test split (test), as the paper reports it) (of the "
          "checkpoint of step 390, not of this export's step 780).") in card
  # A second fine-tuning of the pretraining, in another subdir: listed after, named.
  card = _card(evaluations={"knn": None, "linear": None, "finetune": finetune,
                            "finetune:finetune_semi10": {**finetune, "num_labelled": 5000,
                                                         "label_fraction": 0.1}})
  first = card.index("- Fine-tuning (whole network on 500 labelled images")
  second = card.index("- Fine-tuning (finetune_semi10.json; whole network on 5000 labelled "
                      "images (0.1 of cifar10 train)")
  assert first < second


def test_an_imported_backbone_says_where_it_came_from():
  imported = {"path": "/w/resnet50.pth", "sha256": "cd" * 32, "read": 318,
              "source": "the top level", "ignored": ["fc.bias", "fc.weight"]}
  record = {"model": {"backbone": "resnet50", "cifar_stem": False, "width": 64,
                      "projector": [8192, 8192, 8192]}, "imported": imported,
            "data": {"dataset": "imagenet100", "image_size": 224}}
  card = _card(record=record, step=0, config={**_CONFIG, "dataset": "imagenet100"})
  assert card.startswith("# resnet50 (ImageNet stem), vicreg, imagenet100, step 0\n")
  assert (f"The backbone was imported from `/w/resnet50.pth` (sha256 `{'cd' * 32}`; 318 "
          "tensors of the top level, 2 classifier keys ignored) and trained 0 steps") in card
  assert "the checkpoint does not record its steps per epoch" in card
  assert "- Not recorded (no spectrum" in card
  assert "ImageNet's terms of access" in card
  assert "net.conv1 = " not in card  # the ImageNet stem is torchvision's own

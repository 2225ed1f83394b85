"""The ML core in plain PyTorch: dataset and augmentation, the training epoch, evaluation,
checkpoints and the federated round's local work. No Ray, no Flower, no gRPC in here: Ray Train
(``orchestrator/training.py``), the owner's Flower client (``owners/client_app.py``) and the
benchmarks all call these functions."""

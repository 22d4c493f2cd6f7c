"""BatchNorm statistics after the weights moved without them (TWA, subspace training)."""
import torch


def recompute_batchnorm(model, loader, device=None):
    """Recompute every BatchNorm's running mean and variance from scratch: the statistics
    are reset, momentum set to None (a cumulative average over all batches), and the loader's
    inputs (a batch, or the first element of a (input, target) batch) run through the model in
    train mode without gradients; momentum and the train/eval mode are restored.
    torch.optim.swa_utils.update_bn does exactly this."""
    torch.optim.swa_utils.update_bn(loader, model, device)

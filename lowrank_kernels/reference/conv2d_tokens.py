"""A Conv2d layer as a linear layer over tokens (im2col): the helper the conv2d references use."""
import torch


def input_tokens(X, kernel_size, stride, padding, dilation):
    """X (B, C_in, H, W) -> (B, H_out·W_out, C_in·kh·kw): row t holds the receptive field of
    output pixel t, columns ordered (c, i, j) like a Conv2d weight (C_out, C_in/groups, kh, kw)."""
    cols = torch.nn.functional.unfold(X, kernel_size, dilation=dilation, padding=padding,
                                      stride=stride)
    return cols.transpose(1, 2)


def output_tokens(E):
    """E (B, C_out, H_out, W_out) -> (B, H_out·W_out, C_out)."""
    return E.flatten(2).transpose(1, 2)

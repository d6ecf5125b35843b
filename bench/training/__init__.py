"""Training the networks certbench compares: the recipe registry (`recipes`: standard,
GloRo, Lipschitz-Margin Training, IBP / CROWN-IBP / CROWN, Gaussian noise, Gaussian Loss
Smoothing), the training loop that runs any of them (`train`), the fused certified losses
they use (`loss_fusion`) and Gaussian Loss Smoothing's gradient estimators (`gls`)."""

"""Training the networks certbench compares: the recipes (`train`: standard, GloRo,
Lipschitz-Margin Training, IBP / CROWN-IBP / CROWN, Gaussian noise, Gaussian Loss
Smoothing), the fused certified losses they use (`loss_fusion`) and Gaussian Loss
Smoothing's gradient estimators (`gls`)."""

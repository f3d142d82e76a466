"""Reinforcement learning for Runge-Kutta meta-updates: each stage's data are rollouts of that stage's policy.

* :mod:`rkfast.rl.navigation`: 2-D point navigation (Finn et al. 2017), vectorized over tasks, episodes
  and time steps;
* :mod:`rkfast.rl.policy`: the Gaussian MLP policy and batched action sampling with per-task parameters;
* :mod:`rkfast.rl.baseline`: discounted returns and the per-task linear feature baseline (Duan et al. 2016);
* :mod:`rkfast.rl.dice`: the DiCE objective (Foerster et al. 2018) with its baseline term (Mao et al.
  2019), whose derivatives of every order estimate those of the expected return.
"""

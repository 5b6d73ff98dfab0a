"""Small models shipped with pathsmc (weights in ``models/weights``), for demos and tests.

- :mod:`pathsmc.models.digits`: a class-conditional DDPM on scikit-learn's 8×8 digits, a CNN
  reward classifier and a logistic-regression judge (:func:`load_digits_model`,
  :func:`load_reward_classifier`, :func:`load_judge_classifier`).
- :mod:`pathsmc.models.exact_gaussian`: ``ExactGaussianEps``, the exact ε-prediction of
  N(0, I) data as a diffusers-style denoiser (steering checks with known answers).

Loading needs diffusers, safetensors (and scikit-learn for the data); nothing is downloaded.
"""

"""Small models shipped with pathsmc (weights in ``models/weights``), for demos and tests.

- :mod:`pathsmc.models.digits`: a class-conditional DDPM on scikit-learn's 8×8 digits, a CNN
  reward classifier and a logistic-regression judge (:func:`load_digits_model`,
  :func:`load_reward_classifier`, :func:`load_judge_classifier`).

Loading needs diffusers, safetensors (and scikit-learn for the data); nothing is downloaded.
"""

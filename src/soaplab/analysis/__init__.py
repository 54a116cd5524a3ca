"""soaplab.analysis: what the two analysis papers compute, on a small real model.

This layer never touches the optimizers' internals; it measures the objects their
preconditioners approximate, with dense float64 linear algebra on small layers:

* :mod:`~soaplab.analysis.curvature` - per-example and per-class gradients of one weight via
  ``torch.func``; Gauss-Newton matrix, empirical Fisher, gradient covariance, exact Hessian.
* :mod:`~soaplab.analysis.kronecker` - optimal Kronecker approximation (rearrangement + power
  iteration, SVD check), Shampoo's factors, Shampoo² = L⊗R and Shampoo = L^½⊗R^½, matrix cosine
  ("A New Perspective on Shampoo's Preconditioner", arXiv 2406.17748).
* :mod:`~soaplab.analysis.whitening` - C^{-1/2} and the idealized Adam, Shampoo and SOAP
  preconditioners built from C ("Understanding SOAP from the Perspective of Gradient
  Whitening", arXiv 2509.22938).
* :mod:`~soaplab.analysis.study` trains an MLP on digits (or Fashion-MNIST) with any registered
  optimizer and records those measures at snapshot steps; :mod:`~soaplab.analysis.report`
  renders the run folder; :mod:`~soaplab.analysis.commands` is ``soaplab analyze``.
"""

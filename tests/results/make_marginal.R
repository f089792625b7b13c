# The marginal-effects reference (study field `marginal`): standardised risks of a binary
# exposure by g-computation, their difference and ratio with delta-method intervals, from base
# R's glm and predict() (and sandwich's HC0 covariance).
#
# Input: marginal_input.csv (public data: 3,000 person-years of the RAND Health Insurance
# Experiment over 4 services; see make_inputs.py). The exposure is the individual deductible
# plan (idp), interacting with the chronic disease index (disea); outcomes any visit (anyvis,
# binomial) with the model-based covariance (vcov) and with HC0 (sandwich::vcovHC, type "HC0"),
# and the number of visits (mdvis, poisson) with vcov. (Not the visits with HC0: their squared
# residuals are so skewed that at one service they rest on fewer than 20 effective rows, and the
# node rightly refuses to release that sandwich.)
#
# For each model, on the glm refitted to convergence (common.R's glm_exact), with the exposure
# set to 1 (d1) and to 0 (d0) for every row and mu(eta) the inverse link:
#   r1 = mean(predict(fit, newdata = d1, type = "response")), r0 likewise on d0;
#   RD = r1 - r0, RR = r1 / r0;
#   the gradients of the mean predictions with respect to beta, X1 and X0 the designs of d1 and
#   d0 (model.matrix of the fit's terms: the interaction idp:disea becomes disea and 0):
#     g1 = colMeans(mu'(eta1) * X1), g0 = colMeans(mu'(eta0) * X0), mu' = family$mu.eta;
#   SE(RD) = sqrt(J' V J), J = g1 - g0;
#   SE(log RR) = sqrt(K' V K), K = g1 / r1 - g0 / r0;
#   95% limits RD +- z SE(RD) and RR exp(+- z SE(log RR)), z = qnorm(0.975).
# The gradients are checked against central differences of the mean predictions (predict() at
# beta +- h e_k), so the closed form above is the derivative of what predict() returns.
#
# Recorded per model: family, formula, exposure, cov_type, n, the coefficients with the
# standard errors of V, and `marginal`, named as iaptnet's results name it.
#
# Run from tests/results: Rscript make_marginal.R (make references).

source("common.R")
suppressPackageStartupMessages(library(sandwich))

d <- read.csv("marginal_input.csv", stringsAsFactors = FALSE)

EXPOSURE <- "idp"
Z <- qnorm(0.975)
BINOMIAL <- "anyvis ~ idp * disea + lncoins + lpi + physlm + hlthg + hlthf"
POISSON <- "mdvis ~ idp * disea + lncoins + lpi + fmde + physlm + hlthg + hlthf"
models <- list(
  binomial_nonrobust = list(family = binomial(), formula = BINOMIAL, cov_type = "nonrobust"),
  binomial_hc0 = list(family = binomial(), formula = BINOMIAL, cov_type = "HC0"),
  poisson_nonrobust = list(family = poisson(), formula = POISSON, cov_type = "nonrobust")
)

# The data with the exposure set to `value` for every row.
set_exposure <- function(data, value) {
  data[[EXPOSURE]] <- value
  data
}

# The mean prediction over `data` at coefficients `beta` (predict() of a copy of the fit).
mean_prediction <- function(fit, data, beta) {
  fit$coefficients <- beta
  mean(predict(fit, newdata = data, type = "response"))
}

g_computation <- function(fit, V, data) {
  beta <- coef(fit)
  rhs <- delete.response(terms(fit))
  d1 <- set_exposure(data, 1)
  d0 <- set_exposure(data, 0)
  X1 <- model.matrix(rhs, d1)
  X0 <- model.matrix(rhs, d0)
  stopifnot(identical(colnames(X1), names(beta)), identical(colnames(X0), names(beta)))
  eta1 <- drop(X1 %*% beta)
  eta0 <- drop(X0 %*% beta)
  # The standardised risks: mean counterfactual predictions (checked against the designs).
  r1 <- mean(predict(fit, newdata = d1, type = "response"))
  r0 <- mean(predict(fit, newdata = d0, type = "response"))
  stopifnot(isTRUE(all.equal(r1, mean(fit$family$linkinv(eta1)), tolerance = 1e-14)),
            isTRUE(all.equal(r0, mean(fit$family$linkinv(eta0)), tolerance = 1e-14)))
  # Their gradients with respect to beta: d mean(mu(X beta)) / d beta = colMeans(mu'(eta) X).
  g1 <- colMeans(fit$family$mu.eta(eta1) * X1)
  g0 <- colMeans(fit$family$mu.eta(eta0) * X0)
  # ... against central differences of the mean predictions.
  numeric <- sapply(seq_along(beta), function(k) {
    h <- 1e-6 * max(1, abs(beta[[k]]))
    up <- beta
    down <- beta
    up[k] <- up[k] + h
    down[k] <- down[k] - h
    c((mean_prediction(fit, d1, up) - mean_prediction(fit, d1, down)) / (2 * h),
      (mean_prediction(fit, d0, up) - mean_prediction(fit, d0, down)) / (2 * h))
  })
  stopifnot(max(abs(numeric - rbind(g1, g0))) < 1e-7 * max(abs(rbind(g1, g0))))
  J <- g1 - g0
  K <- g1 / r1 - g0 / r0
  rd <- r1 - r0
  rr <- r1 / r0
  se_rd <- sqrt(drop(t(J) %*% V %*% J))
  se_log_rr <- sqrt(drop(t(K) %*% V %*% K))
  list(term = EXPOSURE, risk_exposed = r1, risk_unexposed = r0,
       risk_difference = rd, rd_std_error = se_rd, rd_low = rd - Z * se_rd, rd_high = rd + Z * se_rd,
       risk_ratio = rr, rr_low = rr * exp(-Z * se_log_rr), rr_high = rr * exp(Z * se_log_rr),
       log_rr_std_error = se_log_rr)
}

results <- lapply(models, function(spec) {
  fit <- glm_exact(as.formula(spec$formula), spec$family, d)
  V <- if (spec$cov_type == "HC0") vcovHC(fit, type = "HC0") else vcov(fit)
  c(list(family = spec$family$family, formula = spec$formula, exposure = EXPOSURE,
         cov_type = spec$cov_type, n = nrow(d)),
    coef_table(fit, V),
    list(marginal = g_computation(fit, V, d)))
})

write_reference(results, "marginal", "make_marginal.R", c("sandwich", "jsonlite"))

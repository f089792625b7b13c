# The meta-analysis reference (kind = "meta"), from R's glm and metafor::rma.
#
# Input: meta_input.csv (5 services). Each service's own fit is glm(y ~ x + z + g, binomial) on
# its rows (levels it lacks dropped, as iaptnet drops their columns); the exposure x's estimate
# and its variance (the squared model-based standard error) go to metafor::rma:
#   - fixed effect: method = "FE" (inverse variance; Q, and I^2 = (Q - (k-1)) / Q truncated at 0);
#   - random effects: method = "DL" and method = "REML", Wald (normal) tests and CIs (test = "z",
#     the default); I^2 = tau^2 / (tau^2 + s^2), s^2 = (k-1) / (sum w - sum w^2 / sum w);
#   - the 95% prediction interval with t on k - 2 degrees of freedom, as iaptnet reports it
#     (Higgins, Thompson & Spiegelhalter 2009): predict(..., pi.type = "riley"); metafor's
#     default would use the normal quantile.
# REML's Fisher scoring stops when a step changes tau^2 by less than control$threshold
# (default 1e-5); it is set to 1e-12 here, and the JSON records it.
#
# For few studies (the study field ci = "hksj"):
#   - random_reml_hksj: rma(yi, vi, method = "REML", test = "knha"), the Hartung-Knapp-Sidik-
#     Jonkman interval: SE^2 = sum w (y - mu)^2 / ((k - 1) sum w), w = 1 / (v + tau^2), t on
#     k - 1 df, no truncation (that would be test = "adhoc"); its prediction interval is
#     predict(..., pi.type = "riley"): t on k - 2 df with the HKSJ SE;
#   - tau2_ci: confint(REML fit), the Q-profile interval for tau^2 (and tau, I^2, H^2): the
#     tau^2 where the generalised Q equals the chi-square quantiles on k - 1 df. confint finds
#     them with uniroot at tol = .Machine$double.eps^0.25 (about 1e-4, absolute) by default;
#     QP_TOL (1e-12) is passed instead, and the JSON records it. The DL fit's confint gives the
#     same bounds (the interval does not depend on the estimator of tau^2), checked here.
#   - edge_cases: literal estimates and variances (not glm fits) for the Q-profile's edges, as
#     metafor's confint.rma.uni handles them: Q at tau^2 = 0 below the lower quantile (the
#     interval is empty, reported as [0, 0] with ci.null), below the upper quantile (lower
#     bound 0), and k = 2 with the upper bound beyond the search range max(100, 10 tau^2)
#     (reported as that end with ub.sign ">"); with the REML and HKSJ summaries of each.
#
# Run from tests/results: Rscript make_meta.R (make references).

source("common.R")
suppressPackageStartupMessages(library(metafor))

d <- read.csv("meta_input.csv", stringsAsFactors = FALSE)
d$g <- factor(d$g, levels = c("a", "b", "c"))
sites <- unique(d$site)

per_service <- lapply(setNames(sites, sites), function(s) {
  rows <- droplevels(d[d$site == s, ])
  fit <- glm_exact(y ~ x + z + g, binomial(), rows)
  list(estimate = coef(fit)[["x"]], std_error = sqrt(vcov(fit)["x", "x"]), n = nrow(rows))
})
yi <- sapply(per_service, `[[`, "estimate")
vi <- sapply(per_service, `[[`, "std_error")^2

REML_THRESHOLD <- 1e-12
fits <- list(
  fixed = rma(yi, vi, method = "FE"),
  random_dl = rma(yi, vi, method = "DL"),
  random_reml = rma(yi, vi, method = "REML", control = list(threshold = REML_THRESHOLD, maxiter = 10000))
)

summarise <- function(res, random) {
  out <- list(estimate = c(res$b), std_error = res$se, statistic = res$zval, p_value = res$pval,
              conf_low = res$ci.lb, conf_high = res$ci.ub, k = res$k, Q = res$QE, Q_df = res$k - 1L,
              Q_p_value = res$QEp, I2 = res$I2 / 100,
              weights = as.list(setNames(unname(weights(res)) / 100, names(yi))))
  if (random) {
    pred <- predict(res, pi.type = "riley")
    out <- c(out, list(tau2 = res$tau2, tau = sqrt(res$tau2), prediction_low = pred$pi.lb,
                       prediction_high = pred$pi.ub))
  }
  out
}

QP_TOL <- 1e-12
reml <- function(yi, vi, test = "z") {
  rma(yi, vi, method = "REML", test = test, control = list(threshold = REML_THRESHOLD, maxiter = 10000))
}

hksj_summary <- function(res) {
  pred <- predict(res, pi.type = "riley")
  list(estimate = c(res$b), std_error = res$se, statistic = res$zval, p_value = res$pval, df = res$ddf,
       conf_low = res$ci.lb, conf_high = res$ci.ub, tau2 = res$tau2, H2 = res$H2,
       prediction_low = pred$pi.lb, prediction_high = pred$pi.ub)
}

qprofile <- function(res) {
  ci <- confint(res, type = "QP", control = list(tol = QP_TOL))
  r <- ci$random
  list(tau2_low = r["tau^2", "ci.lb"], tau2_high = r["tau^2", "ci.ub"],
       tau_low = r["tau", "ci.lb"], tau_high = r["tau", "ci.ub"],
       I2_low = r["I^2(%)", "ci.lb"] / 100, I2_high = r["I^2(%)", "ci.ub"] / 100,
       H2_low = r["H^2", "ci.lb"], H2_high = r["H^2", "ci.ub"],
       ci_null = ci$ci.null, lb_sign = ci$lb.sign, ub_sign = ci$ub.sign)
}

hksj <- reml(yi, vi, test = "knha")
tau2_ci <- qprofile(fits$random_reml)
stopifnot(isTRUE(all.equal(qprofile(fits$random_dl), tau2_ci, tolerance = 1e-10)))

edge_inputs <- list(
  empty = list(yi = c(0.100, 0.102, 0.099, 0.101), vi = c(0.010, 0.012, 0.015, 0.011)),
  lower_zero = list(yi = c(0.10, 0.25, 0.05, 0.20, 0.15), vi = c(0.010, 0.020, 0.015, 0.010, 0.012)),
  two_studies = list(yi = c(0.2, 0.9), vi = c(0.02, 0.03))
)
edge_cases <- lapply(edge_inputs, function(e) {
  fit <- reml(e$yi, e$vi)
  list(yi = e$yi, vi = e$vi, tau2 = fit$tau2, H2 = fit$H2, random_reml_hksj = hksj_summary(reml(e$yi, e$vi, "knha")),
       tau2_ci = qprofile(fit))
})
stopifnot(edge_cases$empty$tau2_ci$ci_null, edge_cases$lower_zero$tau2_ci$tau2_low == 0,
          edge_cases$lower_zero$tau2_ci$tau2_high > 0, edge_cases$two_studies$tau2_ci$ub_sign == ">")

result <- list(
  model = "glm(y ~ x + z + g, family = binomial) per service; exposure x",
  per_service = lapply(per_service, function(e) e[c("estimate", "std_error")]),
  fixed = summarise(fits$fixed, FALSE),
  random_dl = summarise(fits$random_dl, TRUE),
  random_reml = summarise(fits$random_reml, TRUE),
  reml_threshold = REML_THRESHOLD,
  random_reml_hksj = hksj_summary(hksj),
  tau2_ci = tau2_ci,
  qp_tol = QP_TOL,
  edge_cases = edge_cases
)
write_reference(result, "meta", "make_meta.R", c("metafor", "jsonlite"))

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

result <- list(
  model = "glm(y ~ x + z + g, family = binomial) per service; exposure x",
  per_service = lapply(per_service, function(e) e[c("estimate", "std_error")]),
  fixed = summarise(fits$fixed, FALSE),
  random_dl = summarise(fits$random_dl, TRUE),
  random_reml = summarise(fits$random_reml, TRUE),
  reml_threshold = REML_THRESHOLD
)
write_reference(result, "meta", "make_meta.R", c("metafor", "jsonlite"))

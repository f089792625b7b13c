# The GLM robust covariance reference (cov_type = "cluster" and "HC0"), from R's glm and sandwich.
#
# Input: glm_input.csv (4 services, 12 clinics each). iaptnet's covariance
# (iaptnet/coordinator/glm.py, ModelFit.covariance, as statsmodels computes it):
#   - "HC0": (X'WX)^-1 M (X'WX)^-1, M the sum over rows of the score's outer product:
#     sandwich::vcovHC(fit, type = "HC0");
#   - "cluster": the same with M summed over clusters first, times statsmodels' small-sample
#     factor G/(G-1) * (n-1)/(n-p): sandwich::vcovCL(fit, cluster = clinic, type = "HC1",
#     cadjust = TRUE) (cadjust: G/(G-1); HC1: (n-1)/(n-k)).
# Prior weights are glm's weights (statsmodels' var_weights); the binomial glm's warning about
# non-integer successes under non-integer weights is muffled, as in make_iptw.R. The gaussian
# dispersion is R's: the weighted Pearson statistic over n - p.
#
# Run from tests/results: Rscript make_glm.R (make references).

source("common.R")
suppressPackageStartupMessages(library(sandwich))

d <- read.csv("glm_input.csv", stringsAsFactors = FALSE)
d$g <- factor(d$g, levels = c("a", "b", "c"))

quiet_binomial <- function(expr) {
  withCallingHandlers(expr, warning = function(w) {
    if (grepl("non-integer #successes", conditionMessage(w), fixed = TRUE)) invokeRestart("muffleWarning")
  })
}

models <- list(
  binomial_weighted_cluster = list(family = binomial(), formula = y ~ x + g + h, weights = "wt", cov = "cluster"),
  gaussian_cluster = list(family = gaussian(), formula = w ~ x + g + h, weights = NULL, cov = "cluster"),
  binomial_hc0 = list(family = binomial(), formula = y ~ x + g + h, weights = NULL, cov = "HC0"),
  gaussian_weighted_hc0 = list(family = gaussian(), formula = w ~ x + g + h, weights = "wt", cov = "HC0")
)

results <- lapply(models, function(spec) {
  w <- if (is.null(spec$weights)) NULL else d[[spec$weights]]
  fit <- quiet_binomial(glm_exact(spec$formula, spec$family, d, weights = w))
  robust <- if (spec$cov == "cluster") {
    vcovCL(fit, cluster = d$clinic, type = "HC1", cadjust = TRUE)
  } else {
    vcovHC(fit, type = "HC0")
  }
  c(list(family = spec$family$family, formula = deparse(spec$formula),
         weights = if (is.null(spec$weights)) "" else spec$weights, cov_type = spec$cov, n = nrow(d),
         n_clusters = if (spec$cov == "cluster") length(unique(d$clinic)) else 0L,
         deviance = deviance(fit), null_deviance = fit$null.deviance,
         dispersion = summary(fit)$dispersion),
    coef_table(fit, robust),
    list(std_error_model = as.list(sqrt(diag(vcov(fit))))))
})

write_reference(results, "glm", "make_glm.R", c("sandwich", "jsonlite"))

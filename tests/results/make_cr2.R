# The small-sample cluster-robust reference (cov_type = "CR2"), from R's glm and clubSandwich.
#
# Input: cr2_input.csv (public data: 4,000 person-years of the RAND Health Insurance
# Experiment over 5 services of unequal size; see make_inputs.py). Clusters are either the
# services themselves (`service`: each node holds one, J = 5) or the insurance arm within each
# service (`arm`, free care or coinsurance: J = 10, finer than the nodes). For each model,
# clubSandwich's
#   coef_test(fit, vcov = vcovCR(fit, cluster = ..., type = "CR2"), test = "Satterthwaite")
#   conf_int(fit, vcov = <the same>, test = "Satterthwaite")
# on the glm refitted to convergence (common.R's glm_exact): the Bell-McCaffrey bias-reduced
# sandwich with the working model glm's variance function (vcovCR.glm's default target,
# inverse_var = TRUE) and Satterthwaite degrees of freedom per coefficient; p-values and 95%
# limits on t(df). Recorded: the coefficients, the CR2 standard errors, df, p-values, the
# limits, the model-based standard errors, n and the number of clusters.
#
# Run from tests/results: Rscript make_cr2.R (make references).

source("common.R")
suppressPackageStartupMessages(library(clubSandwich))

d <- read.csv("cr2_input.csv", stringsAsFactors = FALSE)

RHS <- "lncoins + idp + lpi + physlm + hlthg + hlthf"
models <- list(
  binomial_service = list(family = binomial(), formula = paste("anyvis ~", RHS, "+ disea"), cluster = "service"),
  binomial_arm = list(family = binomial(), formula = paste("anyvis ~", RHS, "+ disea"), cluster = "arm"),
  poisson_service = list(family = poisson(), formula = paste("mdvis ~", RHS, "+ fmde + disea"), cluster = "service"),
  poisson_arm = list(family = poisson(), formula = paste("mdvis ~", RHS, "+ fmde + disea"), cluster = "arm"),
  gaussian_service = list(family = gaussian(), formula = "disea ~ physlm + hlthg + hlthf + idp + lpi", cluster = "service"),
  gaussian_arm = list(family = gaussian(), formula = "disea ~ physlm + hlthg + hlthf + idp + lpi", cluster = "arm"),
  gaussian_weighted_arm = list(family = gaussian(), formula = "disea ~ hlthg + hlthf + idp + lpi", cluster = "arm",
                               weights = "wt")
)

named <- function(values, names) as.list(setNames(as.numeric(values), names))

results <- lapply(models, function(spec) {
  formula <- as.formula(spec$formula)
  w <- if (is.null(spec$weights)) NULL else d[[spec$weights]]
  fit <- glm_exact(formula, spec$family, d, weights = w)
  cluster <- d[[spec$cluster]]
  # (vcovCR forms each cluster's n x n matrices: computed once for both.)
  V <- vcovCR(fit, cluster = cluster, type = "CR2")
  test <- coef_test(fit, vcov = V, test = "Satterthwaite")
  ci <- conf_int(fit, vcov = V, test = "Satterthwaite", level = 0.95)
  terms <- names(coef(fit))
  stopifnot(identical(as.character(test$Coef), terms), isTRUE(all.equal(ci$df, test$df_Satt)))
  list(family = spec$family$family, formula = spec$formula, cluster = spec$cluster,
       weights = if (is.null(spec$weights)) "" else spec$weights,
       n = nrow(d), n_clusters = length(unique(cluster)),
       estimate = named(coef(fit), terms),
       std_error = named(test$SE, terms),
       df = named(test$df_Satt, terms),
       p_value = named(test$p_Satt, terms),
       conf_low = named(ci$CI_L, terms),
       conf_high = named(ci$CI_U, terms),
       std_error_model = named(sqrt(diag(vcov(fit))), terms))
})

write_reference(results, "cr2", "make_cr2.R", c("clubSandwich", "sandwich", "jsonlite"))

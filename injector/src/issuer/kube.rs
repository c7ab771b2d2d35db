//! The TokenReview against the real API server.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use meshlet_api::identity::TOKEN_AUDIENCE;

use super::{Review, ReviewError, ReviewFuture, TokenReviewer};

/// Reviews tokens with `POST /apis/authentication.k8s.io/v1/tokenreviews` for the
/// audience `meshlet`; needs `create` on `tokenreviews` (the chart's ClusterRole).
#[derive(Clone)]
pub struct KubeReviewer {
    api: Api<TokenReview>,
}

impl std::fmt::Debug for KubeReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeReviewer")
    }
}

impl KubeReviewer {
    /// A reviewer using `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    async fn call(&self, token: &str) -> Result<Review, ReviewError> {
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                // The API server then authenticates the token only if it was minted
                // for this audience, and echoes the audiences it matched.
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let out = self
            .api
            .create(&PostParams::default(), &tr)
            .await
            .map_err(|e| ReviewError(e.to_string()))?;
        let st = out.status.unwrap_or_default();
        Ok(Review {
            authenticated: st.authenticated.unwrap_or(false),
            username: st.user.and_then(|u| u.username).unwrap_or_default(),
            audiences: st.audiences.unwrap_or_default(),
            error: st.error.filter(|e| !e.is_empty()),
        })
    }
}

impl TokenReviewer for KubeReviewer {
    fn review<'a>(&'a self, token: &'a str) -> ReviewFuture<'a> {
        Box::pin(self.call(token))
    }
}

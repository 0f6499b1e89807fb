/* Clerk in the browser (only loaded when Clerk is configured): the hosted sign-in component on the
 * login page, a fresh __session cookie on the chat page (Clerk's SDK refreshes it), fresh tokens
 * for the socket (window.chatappFreshToken), and sign-out.
 * The server verifies that cookie on every page, API call and socket (accounts/clerk.py). */
(() => {
  "use strict";

  function whenClerk(callback) {
    const started = Date.now();
    const wait = () => {
      if (window.Clerk) {
        window.Clerk.load().then(() => callback(window.Clerk));
      } else if (Date.now() - started < 15000) {
        setTimeout(wait, 50);
      }
    };
    wait();
  }

  whenClerk((clerk) => {
    // The chat page's socket lasts as long as the token it holds; app.js asks here for a fresh one
    // before it expires ("force": not Clerk's cached one) and sends it in an "auth" frame.
    window.chatappFreshToken = (force) =>
      clerk.session ? clerk.session.getToken(force ? { skipCache: true } : undefined) : Promise.resolve(null);
    const mount = document.getElementById("clerk-sign-in");
    if (mount) {
      const target = mount.dataset.afterSignIn || "/";
      if (clerk.user) {
        window.location.assign(target);
        return;
      }
      clerk.mountSignIn(mount, { forceRedirectUrl: target, signUpForceRedirectUrl: target });
    }
    const signOut = document.getElementById("clerk-signout");
    if (signOut) {
      signOut.addEventListener("click", async () => {
        // The chat page (app.js) stops writing and forgets what this browser keeps of the
        // conversations: the outbox in localStorage and the service worker's copies.
        if (window.chatappSignOut) await window.chatappSignOut();
        await clerk.signOut();
        window.location.assign("/accounts/login/");
      });
    }
  });
})();

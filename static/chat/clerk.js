/* Clerk in the browser (only loaded when Clerk is configured): the hosted sign-in component on the
 * login page, a fresh __session cookie on the chat page (Clerk's SDK refreshes it), and sign-out.
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
        // Forget what this browser keeps of the conversations: the offline copies of the page and the
        // data (sw.js) and the outbox in localStorage. Clerk's sign-out does not pass through our
        // logout, whose Clear-Site-Data does the same for a local sign-out.
        window.dispatchEvent(new Event("chatapp:signout")); // the chat page stops writing its outbox
        try {
          for (let i = localStorage.length - 1; i >= 0; i--) {
            const key = localStorage.key(i);
            if (key && key.startsWith("chatapp.")) localStorage.removeItem(key);
          }
        } catch (_) {
          // Storage may be unavailable: signing out matters more.
        }
        try {
          if ("caches" in window) await Promise.all((await caches.keys()).filter((k) => k.startsWith("chatapp-")).map((k) => caches.delete(k)));
        } catch (_) {
          // Same.
        }
        await clerk.signOut();
        window.location.assign("/accounts/login/");
      });
    }
  });
})();
